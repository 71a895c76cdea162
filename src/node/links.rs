//! The control thread's EN↔CN links: a CN's accepted connections until
//! they authenticate (`crate::pending`), the `Hello` exchange that binds
//! link messages to each connection, hand-over to core 0, keepalives and
//! link failures; an EN's connects and `Attach`es.

use super::*;
use std::os::fd::RawFd;

/// What became of a pending connection after one of its frames.
enum PendingStep {
    Keep,
    Close,
    /// It authenticated and is a link now (removed from `pending`).
    Attached,
}

impl Control<'_> {
    fn alloc_link(&mut self) -> Option<LinkId> {
        for _ in 0..MAX_LINKS {
            let id = self.next_link;
            self.next_link = (self.next_link + 1) % MAX_LINKS as LinkId;
            if !self.links.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    /// Hands an authenticated (CN side) or freshly connected (EN side)
    /// stream to core 0 as a link; `initial` is what was read past the
    /// handshake and belongs to the link's frame stream.
    pub(super) fn add_link(
        &mut self,
        stream: TcpStream,
        kind: LinkKind,
        my_nonce: Channel,
        peer_auth: Option<(Channel, [u8; 32])>,
        initial: Vec<u8>,
    ) -> Option<LinkId> {
        let _ = stream.set_nodelay(true);
        limit_unsent(&stream);
        let peer = stream.peer_addr().ok()?;
        stream.set_nonblocking(true).ok()?;
        let id = self.alloc_link()?;
        let fd: OwnedFd = stream.into();
        if self
            .cores
            .send(0, Command::AddLink { id, fd, initial })
            .is_err()
        {
            return None;
        }
        self.links.insert(
            id,
            CtlLink {
                kind,
                peer,
                since: Instant::now(),
                my_nonce,
                peer_nonce: peer_auth.map(|p| p.0),
                peer_key: peer_auth.map(|p| p.1),
                attach_waiting: None,
            },
        );
        Some(id)
    }

    /// Accepts what is waiting on the listener as pending connections,
    /// within [`Admission`]'s bounds.
    pub(super) fn accept_links(&mut self) {
        let now = Instant::now();
        if self.accept_paused_until.is_some_and(|t| now < t) {
            return;
        }
        self.accept_paused_until = None;
        loop {
            let Some(l) = self.listener.as_ref() else {
                return;
            };
            match l.accept() {
                Ok((s, peer)) => self.admit(s, peer, now),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // The listener stays readable while the backlog waits:
                    // free a descriptor held by an unauthenticated
                    // connection, or rest, rather than spin.
                    if self.pending.is_empty() {
                        warn!(
                            "out of file descriptors: not accepting edge links for {} ms",
                            ACCEPT_BACKOFF.as_millis()
                        );
                        self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
                        return;
                    }
                    self.close_pending(0);
                }
                Err(e) => {
                    debug!("accept: {e}");
                    return;
                }
            }
        }
    }

    fn admit(&mut self, s: TcpStream, peer: SocketAddr, now: Instant) {
        if let Admit::EvictOldest(scope) = self.admission.decide(peer.ip()) {
            // Pending connections are in arrival order: the first is the
            // oldest.
            if let Some(i) = self.pending.iter().position(|p| scope.holds(p.peer.ip())) {
                self.close_pending(i);
            }
        }
        if s.set_nonblocking(true).is_err() {
            return;
        }
        let _ = s.set_nodelay(true);
        let mut conn = PendingConn::new(s, peer, now, new_channel());
        let me = self.members.identity().overlay;
        let hi = ControlCodec::hi(me, &conn.my_nonce, &self.my_cert, self.codec.suite());
        if !conn.send_frame(&hi) {
            return;
        }
        self.counters.tx.fetch_add(1, Ordering::Relaxed);
        debug!(%peer, "TCP connection accepted");
        self.admission.added(peer.ip());
        self.pending.push(conn);
        self.counters
            .conns_pending
            .store(self.pending.len() as u64, Ordering::Relaxed);
    }

    /// Takes pending connection `i` out (it closes when dropped, unless
    /// the caller makes it a link).
    fn take_pending(&mut self, i: usize) -> PendingConn {
        let p = self.pending.remove(i);
        self.admission.removed(p.peer.ip());
        self.counters
            .conns_pending
            .store(self.pending.len() as u64, Ordering::Relaxed);
        p
    }

    /// Closes pending connection `i` before it authenticated.
    fn close_pending(&mut self, i: usize) {
        let p = self.take_pending(i);
        debug!(peer = %p.peer, "unauthenticated TCP connection closed");
        drop(p);
        self.counters.conns_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads the pending connections that poll found readable (`ready`:
    /// their fds, sorted), and closes those out of time. Only readable ones: an
    /// attacker holding every pending place must not make each wake-up
    /// cost a read per connection.
    pub(super) fn poll_pending(&mut self, ready: &[RawFd]) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.pending.len() {
            if now.saturating_duration_since(self.pending[i].since) > PENDING_TIMEOUT {
                self.close_pending(i);
                continue;
            }
            if ready
                .binary_search(&self.pending[i].stream.as_raw_fd())
                .is_err()
            {
                i += 1;
                continue;
            }
            let step = match self.pending[i].next_frame() {
                Read1::Frame(mut f) => self.on_pending_frame(i, &mut f),
                Read1::Idle => {
                    i += 1;
                    continue;
                }
                Read1::Gone => PendingStep::Close,
            };
            match step {
                // Read on: more frames may be buffered.
                PendingStep::Keep => {
                    if !self.pending[i].flush() {
                        self.close_pending(i);
                    }
                }
                PendingStep::Close => self.close_pending(i),
                PendingStep::Attached => {}
            }
        }
    }

    /// A frame from pending connection `i`: its `Hi` (a certificate we
    /// check), then an `Attach` (it becomes a link) or a `JoinRequest`
    /// (answered here), each sealed by the key the `Hi` proved and bound
    /// to the nonce of ours. Anything else ends it.
    fn on_pending_frame(&mut self, i: usize, pkt: &mut [u8]) -> PendingStep {
        self.counters.rx.fetch_add(1, Ordering::Relaxed);
        match ControlCodec::peek(pkt) {
            Ok(Peeked::Hi { nonce, cert, .. }) if self.pending[i].peer_nonce.is_none() => {
                // One signature check per connection, and connections
                // can be churned: a rate per source network too.
                let ip = self.pending[i].peer.ip();
                if !self.cert_limiter.allow(Instant::now(), ip) {
                    self.counters
                        .join_rate_limited
                        .fetch_add(1, Ordering::Relaxed);
                    return PendingStep::Close;
                }
                return match self.codec.trust(&cert, unix_now()) {
                    Ok(key) => {
                        let conn = &mut self.pending[i];
                        conn.peer_nonce = Some(nonce);
                        conn.peer_key = Some(key);
                        PendingStep::Keep
                    }
                    Err(e) => {
                        debug!(peer = %self.pending[i].peer, "certificate refused: {e}");
                        self.counters.bad_cert.fetch_add(1, Ordering::Relaxed);
                        PendingStep::Close
                    }
                };
            }
            Ok(Peeked::Sealed { sender, .. }) if self.pending[i].peer_key == Some(sender) => {}
            Ok(_) => {
                self.counters.unbound.fetch_add(1, Ordering::Relaxed);
                return PendingStep::Close;
            }
            Err(d) => {
                count_drop(&self.counters, d);
                return PendingStep::Close;
            }
        }
        let Opened {
            hdr,
            channel,
            msg,
            peer,
        } = match self.codec.open(pkt, unix_ms()) {
            Ok(o) => o,
            Err(d) => {
                count_drop(&self.counters, d);
                return PendingStep::Close;
            }
        };
        let conn = &mut self.pending[i];
        let fixed = self.codec.trusted(&peer, unix_now()).and_then(|t| t.fixed);
        match msg {
            _ if channel != conn.my_nonce => {
                debug!(peer = %conn.peer, ?msg, "control message not bound to this connection");
                self.counters.unbound.fetch_add(1, Ordering::Relaxed);
                PendingStep::Close
            }
            ControlMsg::JoinRequest { .. } => {
                let observed = conn.peer;
                match self.join_reply(&msg, &peer, observed, MAX_CONTROL_BODY + CONTROL_OVERHEAD) {
                    Some(reply) if self.pending[i].send_frame(&reply) => {
                        self.counters.tx.fetch_add(1, Ordering::Relaxed);
                        self.counters.joins_answered.fetch_add(1, Ordering::Relaxed);
                        PendingStep::Keep
                    }
                    _ => PendingStep::Close,
                }
            }
            ControlMsg::Attach {
                identity,
                primary,
                seq,
                proof,
            } => {
                let Some(peer_nonce) = conn.peer_nonce else {
                    return PendingStep::Close;
                };
                // The EN speaks for itself only: its identity names the
                // key that sealed this, and its certificate's address.
                if self.role != Role::Core
                    || identity.role != Role::Edge
                    || hdr.src != identity.overlay
                    || identity.dh != peer
                    || !identity.verify()
                    || fixed.is_some_and(|f| f != identity.overlay)
                    || (primary && !self.proves_attachment_here(&identity, seq, &proof))
                {
                    self.counters.unbound.fetch_add(1, Ordering::Relaxed);
                    return PendingStep::Close;
                }
                let conn = self.take_pending(i);
                let my_nonce = conn.my_nonce;
                let (stream, initial) = conn.into_link();
                let kind = LinkKind::Edge {
                    en: Box::new(identity.clone()),
                    primary,
                };
                match self.add_link(stream, kind, my_nonce, Some((peer_nonce, peer)), initial) {
                    Some(id) => self.attached(id, identity, primary, seq, proof),
                    None => warn!(en = %identity.overlay, "no link id free for an edge node"),
                }
                PendingStep::Attached
            }
            _ => PendingStep::Close,
        }
    }

    /// Whether `proof` is `en`'s signature naming this CN its primary at
    /// `seq` (its identity, already verified, gives the key).
    pub(super) fn proves_attachment_here(
        &self,
        en: &NodeIdentity,
        seq: u64,
        proof: &IdentitySig,
    ) -> bool {
        let me = self.members.identity().overlay;
        attach::attachment_proven(&en.sign, en.overlay, en.node_id, seq, me, proof)
    }

    /// Link `id` now carries `identity`'s attachment (first or again);
    /// `proof` is the EN's word for it when `primary` (checked).
    pub(super) fn attached(
        &mut self,
        id: LinkId,
        identity: NodeIdentity,
        primary: bool,
        seq: u64,
        proof: IdentitySig,
    ) {
        info!(en = %identity.overlay, primary, link = id, "edge node attached");
        let (en, en_node_id) = (identity.overlay, identity.node_id);
        if let Some(l) = self.links.get_mut(&id) {
            l.kind = LinkKind::Edge {
                en: Box::new(identity),
                primary,
            };
        }
        if primary {
            // Recorded here too, so that a late announcement of an
            // older attachment from another CN cannot override it.
            let me = self.members.identity().overlay;
            self.fresh_attachments
                .observe(Instant::now(), en, en_node_id, seq, me);
            self.announce_attachment(en, en_node_id, seq, proof);
        }
        // Routes change only with a primary, but status shows backups too.
        self.refresh();
    }

    /// The reply to a `JoinRequest` that authenticated, at most `budget`
    /// bytes sealed, bound to the request's nonce. §3.2 is decided with
    /// everything we know (the offer), even when the list is cut short.
    pub(super) fn join_reply(
        &mut self,
        req: &ControlMsg,
        joiner: &[u8; 32],
        observed: SocketAddr,
        budget: usize,
    ) -> Option<Vec<u8>> {
        let ControlMsg::JoinRequest {
            node_id,
            requested,
            role,
            nonce,
            ..
        } = req
        else {
            return None;
        };
        if self.role != Role::Core || *nonce == NO_CHANNEL {
            return None;
        }
        debug!(%observed, node = %hex_id(*node_id), %role, "join request");
        let me = self.members.identity().clone();
        let all = self.members.members();
        let joiner_sign = self
            .codec
            .trusted(joiner, unix_now())?
            .cert
            .body()
            .node
            .sign;
        let taken = crate::join::taken_for((*joiner, joiner_sign), &all);
        let members = membership::resolve(&all);
        sealed_join_reply(
            &mut self.codec,
            joiner,
            me,
            members,
            taken,
            self.cfg.net,
            self.cfg.net6,
            *requested,
            nonce,
            observed,
            budget,
        )
    }

    pub(super) fn on_connected(&mut self, cn: Ipv4Addr, res: std::io::Result<TcpStream>) {
        let now = Instant::now();
        let id = match res {
            Ok(mut s) => {
                // Our Hi first: the CN checks our certificate, and binds
                // what it sends us to our nonce.
                let my_nonce = new_channel();
                let me = self.members.identity().overlay;
                let hi = ControlCodec::hi(me, &my_nonce, &self.my_cert, self.codec.suite());
                match write_frame(&mut s, &hi) {
                    Ok(()) => self.add_link(s, LinkKind::Core { cn }, my_nonce, None, Vec::new()),
                    Err(e) => {
                        debug!(%cn, "edge link hello failed: {e}");
                        None
                    }
                }
            }
            Err(e) => {
                debug!(%cn, "edge link connect failed: {e}");
                None
            }
        };
        // The link counts as connected once the CN's Hello arrives (see
        // `on_packet`): until then it carries nothing but our Hello, since
        // the CN takes nothing else from a connection that has not
        // authenticated.
        if id.is_none() {
            if let Some(e) = self.edge.as_mut() {
                e.connect_failed(now, cn);
            }
        }
        self.edge_actions();
    }

    pub(super) fn on_link_down(&mut self, id: LinkId) {
        let Some(l) = self.links.remove(&id) else {
            return;
        };
        match l.kind {
            LinkKind::Edge { en, primary } => {
                info!(en = %en.overlay, primary, "edge node link down");
                if primary {
                    self.refresh();
                }
            }
            LinkKind::Core { cn } => {
                if let Some(e) = self.edge.as_mut() {
                    if l.peer_nonce.is_some() {
                        info!(%cn, link = id, "link to core node down");
                        e.link_down(Instant::now(), id);
                    } else {
                        debug!(%cn, "edge link closed before the core node's hello");
                        e.connect_failed(Instant::now(), cn);
                    }
                }
                self.edge_actions();
            }
        }
    }

    pub(super) fn send_frame(&self, id: LinkId, packet: Vec<u8>) -> bool {
        self.cores
            .send(0, Command::SendFrame { id, packet })
            .is_ok()
    }

    pub(super) fn keepalives(&mut self, now: Instant) {
        let me = self.members.identity().overlay;
        let base = self.cores.clock_base;
        let mut dead = Vec::new();
        for (&id, l) in &self.links {
            // Core 0 records arrivals once it has taken the link over; until
            // then (and for an id reused from an old link) count from when
            // we handed it over.
            let seen = (base + Duration::from_nanos(self.cores.link_seen_ns(id))).max(l.since);
            if now.saturating_duration_since(seen) > LINK_DEAD_AFTER {
                dead.push(id);
                continue;
            }
            // Until the peer's Hi arrives there is nothing to bind to.
            let (Some(channel), Some(key)) = (l.peer_nonce, l.peer_key) else {
                continue;
            };
            if let Some(p) = self.codec.seal(
                &ControlMsg::Keepalive,
                me,
                Ipv4Addr::UNSPECIFIED,
                &key,
                &channel,
                unix_ms(),
            ) {
                self.send_frame(id, p);
            }
        }
        for id in dead {
            debug!(link = id, "closing a silent link");
            let _ = self.cores.send(0, Command::CloseLink { id });
        }
    }

    /// Sends an EN's `Attach` on `link`, bound to the CN's nonce (or
    /// keeps it until the CN's `Hello` brings one).
    pub(super) fn send_attach(&mut self, link: LinkId, primary: bool, seq: u64) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        let (Some(channel), Some(key)) = (l.peer_nonce, l.peer_key) else {
            l.attach_waiting = Some((primary, seq));
            return;
        };
        let me = self.members.identity().clone();
        let LinkKind::Core { cn } = l.kind else {
            return;
        };
        let proof =
            attach::prove_attachment(&self.cfg.credentials.key, me.overlay, me.node_id, seq, cn);
        if let Some(p) = self.codec.seal(
            &ControlMsg::Attach {
                identity: me.clone(),
                primary,
                seq,
                proof,
            },
            me.overlay,
            Ipv4Addr::UNSPECIFIED,
            &key,
            &channel,
            unix_ms(),
        ) {
            self.send_frame(link, p);
        }
    }
}

/// Bytes a link's socket may hold that TCP has not sent yet. The kernel
/// would otherwise take megabytes (its send buffer grows to
/// `tcp_wmem`'s maximum), and the queue would stand where no one manages
/// it: every inner flow's packets would wait behind it, and the link's
/// CoDel (`ela_dataplane::codel`), which sees only its own queue, would
/// never see them wait.
const LINK_NOTSENT_LOWAT: libc::c_int = 128 << 10;

fn limit_unsent(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let v: libc::c_int = LINK_NOTSENT_LOWAT;
    // SAFETY: a live socket and a c_int on the stack whose size we pass.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            &v as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
