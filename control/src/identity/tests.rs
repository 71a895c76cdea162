use super::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

const NOW: u64 = 1_800_000_000;
const DAY: u64 = 86_400;

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

fn setup() -> (CaKey, NodeKey, Cert) {
    let ca = CaKey::generate(&mut rng(1));
    let node = NodeKey::generate(&mut rng(2));
    let cert = ca
        .sign(
            &node.public(),
            "cn1.example",
            Some(Ipv4Addr::new(10, 0, 0, 1)),
            NOW - 300,
            NOW + 365 * DAY,
        )
        .unwrap();
    (ca, node, cert)
}

/// RFC 8032 §7.1, test 1: the Ed25519 crate signs as the standard says
/// (the CA and node signatures are plain Ed25519 over domain ‖ message).
#[test]
fn ed25519_known_answer_rfc8032_test1() {
    let seed: [u8; 32] =
        hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
            .unwrap()
            .try_into()
            .unwrap();
    let ca = CaKey::from_seed(seed);
    assert_eq!(
        hex::encode(ca.public().to_bytes()),
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    );
    let sig = ca.key.sign(b"");
    assert_eq!(
        hex::encode(sig.to_bytes()),
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    );
}

/// RFC 7748 §6.1: the X25519 keys are what the standard computes.
#[test]
fn x25519_known_answer_rfc7748() {
    let alice: [u8; 32] =
        hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
            .unwrap()
            .try_into()
            .unwrap();
    let node = NodeKey::from_bytes([7; 32], alice);
    assert_eq!(
        hex::encode(node.public().dh),
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    );
}

/// The encoding is pinned: a certificate signed by a fixed CA for a fixed
/// node has these exact bytes and this fingerprint (Ed25519 signatures
/// are deterministic). A change here breaks every issued certificate.
#[test]
fn certificate_encoding_is_stable() {
    let ca = CaKey::from_seed([1; 32]);
    let node = NodeKey::from_bytes([2; 32], [3; 32]);
    let cert = ca
        .sign(
            &node.public(),
            "n1",
            Some(Ipv4Addr::new(10, 0, 0, 7)),
            100,
            200,
        )
        .unwrap();
    let enc = cert.encode();
    assert_eq!(enc.len(), CERT_FIXED + 4 + 2 + SIG);
    assert_eq!(&enc[..32], &ca.public().to_bytes());
    assert_eq!(
        &enc[96..112],
        &[0, 0, 0, 0, 0, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 200]
    );
    assert_eq!(&enc[112..120], &[4, 10, 0, 0, 7, 2, b'n', b'1']);
    assert_eq!(
        hex32(&cert.fingerprint()),
        hex32(
            &Sha256::new()
                .chain_update(FINGERPRINT_DOMAIN)
                .chain_update(&enc[..enc.len() - SIG])
                .finalize()
                .into()
        )
    );
    assert_eq!(Cert::decode(&enc).unwrap(), cert);
    assert!(cert.verify(&ca.public(), 150).is_ok());
}

#[test]
fn every_file_round_trips() {
    let (ca, node, cert) = setup();
    let ca2 = CaKey::parse(&ca.to_file_string()).unwrap();
    assert_eq!(ca2.public(), ca.public());
    assert_eq!(
        CaPub::parse(&ca.public().to_file_string()).unwrap(),
        ca.public()
    );
    let node2 = NodeKey::parse(&node.to_file_string()).unwrap();
    assert_eq!(node2.public(), node.public());
    assert_eq!(
        NodePubFile::parse(&node.public_file().to_file_string())
            .unwrap()
            .public,
        node.public()
    );
    assert_eq!(Cert::parse(&cert.to_file_string()).unwrap(), cert);
    let rev = ca.revoke(cert.fingerprint(), NOW);
    assert_eq!(Revocation::parse(&rev.to_file_string()).unwrap(), rev);
    // Without the final newline too.
    let s = cert.to_file_string();
    assert_eq!(Cert::parse(s.trim_end()).unwrap(), cert);
}

#[test]
fn a_valid_certificate_verifies_for_its_key() {
    let (ca, node, cert) = setup();
    assert_eq!(cert.verify(&ca.public(), NOW).unwrap(), node.public());
    cert.verify_for(&ca.public(), &node, NOW).unwrap();
    let b = cert.body();
    assert_eq!(b.name, "cn1.example");
    assert_eq!(b.addr, Some(Ipv4Addr::new(10, 0, 0, 1)));
    // The first and last second of validity count.
    cert.verify(&ca.public(), b.not_before).unwrap();
    cert.verify(&ca.public(), b.not_after).unwrap();
}

#[test]
fn expired_early_foreign_or_misused_certificates_are_refused() {
    let (ca, node, cert) = setup();
    let b = cert.body().clone();
    assert_eq!(
        cert.verify(&ca.public(), b.not_after + 1),
        Err(IdentityError::Expired(b.not_after))
    );
    assert_eq!(
        cert.verify(&ca.public(), b.not_before - 1),
        Err(IdentityError::NotYetValid(b.not_before))
    );
    let other = CaKey::generate(&mut rng(9));
    assert!(matches!(
        cert.verify(&other.public(), NOW),
        Err(IdentityError::OtherAuthority { .. })
    ));
    // Another node presenting this certificate.
    let thief = NodeKey::generate(&mut rng(3));
    assert_eq!(
        cert.verify_for(&ca.public(), &thief, NOW),
        Err(IdentityError::KeyMismatch)
    );
    cert.verify_for(&ca.public(), &node, NOW).unwrap();
}

/// Flipping any bit of a certificate makes it undecodable or unverifiable.
#[test]
fn any_changed_bit_is_refused() {
    let (ca, _, cert) = setup();
    let enc = cert.encode();
    for i in 0..enc.len() {
        for bit in 0..8 {
            let mut e = enc.clone();
            e[i] ^= 1 << bit;
            let ok = Cert::decode(&e).and_then(|c| c.verify(&ca.public(), NOW).map(|_| c));
            assert!(ok.is_err(), "byte {i} bit {bit} still verifies");
        }
    }
    // Truncated or extended.
    for n in 0..enc.len() {
        assert!(Cert::decode(&enc[..n]).is_err(), "truncated to {n}");
    }
    let mut long = enc.clone();
    long.push(0);
    assert!(Cert::decode(&long).is_err());
}

/// S + ℓ is the classic malleated Ed25519 signature: same message, other
/// bytes. It must not verify (or a revoked certificate could come back
/// with a fresh-looking signature; the fingerprint excludes the signature
/// as a second guard).
#[test]
fn malleated_signatures_are_refused() {
    let (ca, _, cert) = setup();
    let mut enc = cert.encode();
    let n = enc.len();
    // ℓ = 2^252 + 27742317777372353535851937790883648493, little-endian.
    let l: [u8; 32] =
        hex::decode("edd3f55c1a631258d69cf7a2def9de1400000000000000000000000000000010")
            .unwrap()
            .try_into()
            .unwrap();
    let s = &mut enc[n - 32..];
    let mut carry = 0u16;
    for (x, y) in s.iter_mut().zip(l) {
        let v = *x as u16 + y as u16 + carry;
        *x = v as u8;
        carry = v >> 8;
    }
    let c = Cert::decode(&enc).unwrap();
    assert_eq!(c.fingerprint(), cert.fingerprint());
    assert_eq!(
        c.verify(&ca.public(), NOW),
        Err(IdentityError::BadSignature("certificate"))
    );
}

#[test]
fn names_validity_and_keys_are_checked_when_signing_and_decoding() {
    let ca = CaKey::generate(&mut rng(4));
    let node = NodeKey::generate(&mut rng(5)).public();
    for bad in ["", ".x", "-x", "a b", "é", "a/b", &"x".repeat(MAX_NAME + 1)] {
        assert!(!valid_name(bad), "{bad:?}");
        assert_eq!(
            ca.sign(&node, bad, None, 0, 1),
            Err(IdentityError::BadName),
            "{bad:?}"
        );
    }
    for good in ["a", "cn-1.example_2", &"x".repeat(MAX_NAME)] {
        assert!(valid_name(good), "{good:?}");
        ca.sign(&node, good, None, 0, 1).unwrap();
    }
    assert_eq!(
        ca.sign(&node, "a", None, 2, 1),
        Err(IdentityError::BadValidity)
    );
    // A weak (small-order) CA key or node key is refused on the way in.
    let mut weak = [0u8; 32];
    weak[0] = 1; // the identity point
    assert!(CaPub::from_bytes(&weak).is_err());
    let c = ca.sign(&node, "a", None, 0, 1).unwrap();
    let mut enc = c.encode();
    enc[32..64].copy_from_slice(&weak);
    assert!(matches!(Cert::decode(&enc), Err(IdentityError::BadKey(_))));
    // A small-order X25519 key decodes (decoding is cheap) but never
    // verifies (verifying does the X25519 check).
    let mut enc = c.encode();
    enc[64..96].fill(0);
    let bad = Cert::decode(&enc).unwrap();
    assert!(matches!(
        bad.verify(&ca.public(), 0),
        Err(IdentityError::BadSignature(_) | IdentityError::BadKey(_))
    ));
    let mut enc = c.encode();
    enc[112] = 6;
    assert_eq!(Cert::decode(&enc), Err(IdentityError::BadAddrTag(6)));
}

#[test]
fn files_are_strict_and_say_what_they_are() {
    let (ca, node, cert) = setup();
    // A file of one kind given as another.
    assert!(matches!(
        CaPub::parse(&cert.to_file_string()),
        Err(IdentityError::WrongKind {
            expected: "ela-fast-ca-pub-v1",
            ..
        })
    ));
    assert!(matches!(
        NodePubFile::parse(&node.to_file_string()),
        Err(IdentityError::WrongKind { .. })
    ));
    assert!(matches!(
        CaKey::parse("hello"),
        Err(IdentityError::NotOneLine { .. })
    ));
    let s = ca.public().to_file_string();
    assert!(CaPub::parse(&s.to_uppercase()).is_err());
    let (kind, hex) = s.split_once(' ').unwrap();
    let hex_up = format!("{kind} {}", hex.to_uppercase());
    assert!(matches!(
        CaPub::parse(&hex_up),
        Err(IdentityError::BadHex { .. })
    ));
    assert!(matches!(
        CaPub::parse(&format!("{s}\n")),
        Err(IdentityError::NotOneLine { .. })
    ));
    assert!(CaPub::parse(&s.replace(' ', "  ")).is_err());
    assert!(matches!(
        CaPub::parse("ela-fast-ca-pub-v1 abcd\n"),
        Err(IdentityError::BadLength { .. })
    ));
    // Every error names its fault, and no two read alike.
    let msgs: Vec<String> = [
        IdentityError::WrongKind {
            expected: "a",
            found: "b".into(),
        },
        IdentityError::NotOneLine { kind: "k" },
        IdentityError::BadHex { kind: "k" },
        IdentityError::BadLength {
            what: "w",
            got: 1,
            want: 2,
        },
        IdentityError::BadKey("k"),
        IdentityError::BadAddrTag(9),
        IdentityError::BadName,
        IdentityError::BadValidity,
        IdentityError::BadSignature("s"),
        IdentityError::OtherAuthority {
            what: "w",
            theirs: "t".into(),
            ours: "o".into(),
        },
        IdentityError::Expired(5),
        IdentityError::NotYetValid(5),
        IdentityError::KeyMismatch,
    ]
    .iter()
    .map(|e| e.to_string())
    .collect();
    for (i, m) in msgs.iter().enumerate() {
        assert!(m.len() > 15, "{m}");
        assert!(!msgs[..i].contains(m), "{m}");
    }
}

#[test]
fn revocations_verify_only_under_their_authority_and_unchanged() {
    let (ca, _, cert) = setup();
    let rev = ca.revoke(cert.fingerprint(), NOW);
    rev.verify(&ca.public()).unwrap();
    assert_eq!(rev.fingerprint, cert.fingerprint());
    let other = CaKey::generate(&mut rng(8));
    assert!(matches!(
        rev.verify(&other.public()),
        Err(IdentityError::OtherAuthority { .. })
    ));
    // A revocation forged by another CA but claiming ours.
    let mut forged = other.revoke(cert.fingerprint(), NOW);
    forged.ca = ca.public().to_bytes();
    assert_eq!(
        forged.verify(&ca.public()),
        Err(IdentityError::BadSignature("revocation"))
    );
    let enc = rev.encode();
    for i in 0..enc.len() {
        let mut e = enc.clone();
        e[i] ^= 0x10;
        let ok = Revocation::decode(&e).and_then(|r| r.verify(&ca.public()));
        assert!(ok.is_err(), "byte {i} changed and it still verifies");
    }
    assert!(Revocation::decode(&enc[..enc.len() - 1]).is_err());
    // A CA signature over a revocation is no certificate, and back.
    assert!(Cert::decode(&enc)
        .and_then(|c| c.verify(&ca.public(), NOW))
        .is_err());
}

/// Review finding: the CA got no proof that a node holds the keys it
/// asks to have certified. `node.pub` carries an Ed25519 signature over
/// the X25519 key, so someone else's signing key cannot be paired with
/// one's own X25519 key.
#[test]
fn node_pub_files_prove_the_signing_key() {
    let victim = NodeKey::generate(&mut rng(20));
    let thief = NodeKey::generate(&mut rng(21));
    let good = thief.public_file().to_file_string();
    NodePubFile::parse(&good).unwrap();
    // Victim's signing key beside the thief's X25519 key, with the
    // thief's proof: refused.
    let (kind, hex) = good.trim_end().split_once(' ').unwrap();
    let mut b = hex::decode(hex).unwrap();
    b[..32].copy_from_slice(&victim.public().sign.to_bytes());
    let forged = format!("{kind} {}\n", hex::encode(&b));
    assert_eq!(
        NodePubFile::parse(&forged).err(),
        Some(IdentityError::BadSignature("node public key"))
    );
}

/// The same X25519 key in another encoding (bit 255 set, or ≥ p) is
/// refused everywhere, so one key has one name.
#[test]
fn x25519_keys_must_be_canonical() {
    let ca = CaKey::generate(&mut rng(22));
    let node = NodeKey::generate(&mut rng(23));
    let c = ca.sign(&node.public(), "n", None, 0, 1).unwrap();
    let mut enc = c.encode();
    enc[64 + 31] |= 0x80;
    assert!(matches!(Cert::decode(&enc), Err(IdentityError::BadKey(_))));
    let mut p = [0xffu8; 32];
    p[0] = 0xed;
    p[31] = 0x7f;
    let sign = node.public().sign.to_bytes();
    for dh in [
        p,
        {
            let mut q = p;
            q[0] = 0xee;
            q
        },
        [0xff; 32],
    ] {
        assert!(NodePub::from_bytes(&NodePubBytes { sign, dh }).is_err());
    }
    // Every small-order point is refused (the standard list: 0, 1, the
    // two points of order 8, p − 1; the rest are non-canonical).
    let small: [&str; 4] = [
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ];
    for h in small {
        let dh: [u8; 32] = hex::decode(h).unwrap().try_into().unwrap();
        assert!(
            NodePub::from_bytes(&NodePubBytes { sign, dh }).is_err(),
            "{h}"
        );
    }
}

/// A CA signature without the certificate's domain string (over the bare
/// body, as some other protocol might sign) is no certificate.
#[test]
fn signatures_without_the_domain_are_refused() {
    let (ca, _, cert) = setup();
    let body = cert.body().encode();
    let bare = ca.key.sign(&body).to_bytes();
    let mut enc = body.clone();
    enc.extend_from_slice(&bare);
    let c = Cert::decode(&enc).unwrap();
    assert_eq!(
        c.verify(&ca.public(), NOW),
        Err(IdentityError::BadSignature("certificate"))
    );
    let rev = ca.revoke(cert.fingerprint(), NOW);
    let mut r = rev.encode();
    let n = r.len();
    let bare = ca.key.sign(&r[..n - 64]).to_bytes();
    r[n - 64..].copy_from_slice(&bare);
    assert_eq!(
        Revocation::decode(&r).unwrap().verify(&ca.public()),
        Err(IdentityError::BadSignature("revocation"))
    );
}
