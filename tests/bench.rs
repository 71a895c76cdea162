//! `ela-fast bench` end to end in network namespaces (needs root): two core
//! nodes; `bench latency` and `bench throughput` run as a user would, inside
//! one node's namespace against the other's overlay address, answered by
//! the other node's responders; then the same through an edge node. Without
//! root the test prints a loud SKIPPED line; under CI (`CI=1`) it fails
//! instead.

use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use ela_fast::bench;
use ela_fast::netns::{self, Lab, NodeSpec};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ela-fast");
/// Membership must settle well within this on an idle bridge.
const CONVERGE: Duration = Duration::from_secs(20);
/// A bench aimed at an address nobody has must give up within this
/// (three probes of the default 1 s timeout, or a 3 s TCP connect).
const GIVE_UP: Duration = Duration::from_secs(8);

fn ip(d: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, d)
}

/// The stdout of a command that must have succeeded.
fn stdout_text(what: &str, o: &Output) -> Result<String> {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    ensure!(
        o.status.success(),
        "{what} failed ({}):\n{out}{}",
        netns::describe_status(o.status),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(out)
}

fn stdout_json(what: &str, o: &Output) -> Result<Value> {
    let out = stdout_text(what, o)?;
    serde_json::from_str(&out)
        .with_context(|| format!("{what}: stdout is not one JSON object:\n{out}"))
}

fn num(v: &Value, k: &str) -> Result<f64> {
    v.get(k)
        .and_then(Value::as_f64)
        .ok_or_else(|| anyhow!("no number `{k}` in {v}"))
}

/// Non-zero exit, one stderr line starting with `error:` that says `want`,
/// no panic.
fn check_clean_failure(what: &str, o: &Output, want: &str) -> Result<()> {
    let stderr = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(!o.status.success(), "{what}: exited 0; stderr:\n{stderr}");
    ensure!(!stderr.contains("panicked"), "{what}: panicked:\n{stderr}");
    ensure!(
        lines.len() == 1 && lines[0].starts_with("error:") && lines[0].contains(want),
        "{what}: want one stderr line `error: ...{want}...`, got:\n{stderr}"
    );
    Ok(())
}

/// utime + stime of the node's `ela-bench` thread (USER_HZ ticks).
fn responder_ticks(pid: u32) -> Result<u64> {
    for t in fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = t?.path();
        if fs::read_to_string(dir.join("comm"))?.trim() == "ela-bench" {
            return bench::stat_cpu_ticks(&fs::read_to_string(dir.join("stat"))?);
        }
    }
    Err(anyhow!("node {pid} has no ela-bench thread"))
}

/// `mkfifo(path)`.
fn mkfifo(path: &Path) -> Result<()> {
    let c = cstr(path)?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("mkfifo {}", path.display()));
    }
    Ok(())
}

/// A character device 1:3 (what /dev/null is) at `path`. `false` where
/// this root may not make devices (a user namespace); the test then uses
/// only the FIFO, and says so.
fn make_null_device(path: &Path) -> Result<bool> {
    let c = cstr(path)?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EPERM) {
        eprintln!("NOTE: mknod not permitted here ({e}); the device case is not tested");
        return Ok(false);
    }
    Err(e).context(format!("mknod {}", path.display()))
}

fn cstr(path: &Path) -> Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    Ok(std::ffi::CString::new(path.as_os_str().as_bytes())?)
}

fn is_fifo(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

/// A character device 1:3, by stat only.
fn is_null_device(path: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    fs::symlink_metadata(path)
        .is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == libc::makedev(1, 3))
}

/// Lets a reader blocked opening `fifo` go (it reads end-of-file) if no
/// writer ever came; harmless when one did.
fn unblock_fifo_reader(fifo: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo);
}

/// The bench's temporary files (`.NAME.ela-fast-XXXX.tmp`) in `dir`.
fn temp_files(dir: &Path) -> Result<Vec<String>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".tmp") {
            v.push(name);
        }
    }
    v.sort();
    Ok(v)
}

#[test]
fn bench_latency_and_throughput_over_the_overlay() {
    netns::lab_test("bench", BIN, |lab: &mut Lab| {
        let h1 = lab.add_host("node1")?;
        let h2 = lab.add_host("node2")?;
        let key = lab.keygen("group")?;
        let (n1, _) = lab.start_node(h1, &NodeSpec::new(&key).addr(ip(1)))?;
        let (n2, _) = lab.start_node(h2, &NodeSpec::new(&key).addr(ip(2)).bootstrap(n1.listen))?;
        lab.wait_converged(&[&n1, &n2], 2, CONVERGE)?;

        // 0. Idle responders cost nothing: node2's `ela-bench` thread burns
        //    no CPU tick in a second.
        let idle0 = responder_ticks(n2.pid)?;
        std::thread::sleep(Duration::from_secs(1));
        let idle1 = responder_ticks(n2.pid)?;
        ensure!(
            idle1 - idle0 <= 1,
            "the idle responder thread used {} ticks in 1 s",
            idle1 - idle0
        );

        let dir = lab.dir().to_path_buf();
        let hgrm = dir.join("lat.hgrm").to_string_lossy().into_owned();
        let plot = dir.join("lat.svg").to_string_lossy().into_owned();
        let target = ip(2).to_string();

        // 1. Latency, ping-pong, JSON.
        let t0 = Instant::now();
        let o = lab.exec_timeout(
            h1,
            &[
                BIN, "bench", "latency", "--target", &target, "--count", "500", "--json", "--hgrm",
                &hgrm, "--plot", &plot,
            ],
            Duration::from_secs(60),
        )?;
        let v = stdout_json("bench latency --json", &o)?;
        eprintln!(
            "bench latency --count 500 --json ({:?}):\n{}",
            t0.elapsed(),
            String::from_utf8_lossy(&o.stdout)
        );
        ensure!(v["count"] == 500, "count is not 500: {v}");
        ensure!(v["sent"] == 500, "sent is not 500: {v}");
        ensure!(v["lost"] == 0, "lost is not 0: {v}");
        ensure!(
            v["source"] == "10.0.0.1",
            "probes did not leave from node1's overlay address: {v}"
        );
        let (min, p50, p90, p99, p999, max) = (
            num(&v, "min_us")?,
            num(&v, "p50_us")?,
            num(&v, "p90_us")?,
            num(&v, "p99_us")?,
            num(&v, "p99_9_us")?,
            num(&v, "max_us")?,
        );
        ensure!(p50 > 0.0, "p50 is not positive: {v}");
        ensure!(
            min <= p50 && p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max,
            "percentiles out of order: {v}"
        );
        ensure!(num(&v, "mean_us")? > 0.0, "mean: {v}");
        ensure!(
            v["files"]["hgrm"] == hgrm.as_str() && v["files"]["plot"] == plot.as_str(),
            "files: {v}"
        );
        let text = fs::read_to_string(&hgrm).context("reading the .hgrm")?;
        let parsed = bench::parse_hgrm(&text).context("parsing the .hgrm")?;
        ensure!(
            parsed.total_count == 500,
            "the .hgrm total count is {}",
            parsed.total_count
        );
        let last = parsed
            .rows
            .last()
            .ok_or_else(|| anyhow!("the .hgrm has no rows"))?;
        ensure!(
            last.percentile == 1.0 && last.total_count == 500 && (last.value - max).abs() < 0.002,
            "the .hgrm's last row {last:?} is not 100% / 500 / max {max}"
        );
        for w in parsed.rows.windows(2) {
            ensure!(
                w[0].percentile <= w[1].percentile && w[0].value <= w[1].value,
                "the .hgrm is not monotonic: {w:?}"
            );
        }
        let svg = fs::read_to_string(&plot).context("reading the SVG")?;
        ensure!(
            svg.starts_with("<?xml") && svg.contains("<svg") && svg.trim_end().ends_with("</svg>"),
            "not an SVG document:\n{svg}"
        );
        ensure!(
            svg.contains("<polyline") && svg.contains("99.9%"),
            "no curve or gridlines in the SVG"
        );
        eprintln!("{}", text.lines().take(8).collect::<Vec<_>>().join("\n"));
        eprintln!(
            "...\n{}",
            text.lines()
                .rev()
                .take(4)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );

        // 2. Latency, open loop at 200 µs, the table a user reads.
        let o = lab.exec_timeout(
            h1,
            &[
                BIN,
                "bench",
                "latency",
                "--target",
                &target,
                "--count",
                "2000",
                "--interval-us",
                "200",
                "--hgrm",
                &hgrm,
                "--plot",
                &plot,
            ],
            Duration::from_secs(60),
        )?;
        let out = stdout_text("bench latency --interval-us 200", &o)?;
        eprintln!("bench latency --count 2000 --interval-us 200:\n{out}");
        ensure!(
            out.contains("p99.9") && out.contains("count 2000"),
            "table:\n{out}"
        );

        // 3. Throughput.
        let o = lab.exec_timeout(
            h1,
            &[
                BIN,
                "bench",
                "throughput",
                "--target",
                &target,
                "--duration",
                "2",
                "--streams",
                "2",
                "--json",
            ],
            Duration::from_secs(60),
        )?;
        let v = stdout_json("bench throughput --json", &o)?;
        eprintln!("bench throughput --duration 2 --streams 2 --json:\n{v:#}");
        ensure!(num(&v, "gbit_per_s")? > 0.0, "no throughput: {v}");
        ensure!(num(&v, "packets_per_s")? > 0.0, "no packets: {v}");
        ensure!(num(&v, "duration_s")? >= 2.0, "shorter than asked: {v}");
        ensure!(
            v["bytes"] == v["bytes_sent"],
            "the receiver confirmed other than sent: {v}"
        );
        ensure!(
            v["per_stream"].as_array().map(Vec::len) == Some(2),
            "per_stream: {v}"
        );
        let mss = num(&v, "mss")?;
        ensure!(
            (1000.0..=1380.0).contains(&mss),
            "MSS {mss} does not fit the overlay MTU 1380"
        );
        let n_cpus = fs::read_to_string("/proc/stat")?
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count();
        let cpus = v["cpus"]
            .as_array()
            .ok_or_else(|| anyhow!("no cpus: {v}"))?;
        ensure!(
            cpus.len() == n_cpus,
            "{} CPU entries, {n_cpus} CPUs: {v}",
            cpus.len()
        );
        for c in cpus {
            let busy = num(c, "busy_pct")?;
            ensure!((0.0..=100.0).contains(&busy), "busy_pct {busy}: {c}");
        }
        ensure!(
            num(&v, "cpu_busy_pct")? > 0.0,
            "the machine was idle during the run? {v}"
        );

        // The table form.
        let o = lab.exec_timeout(
            h1,
            &[
                BIN,
                "bench",
                "throughput",
                "--target",
                &target,
                "--duration",
                "1",
            ],
            Duration::from_secs(60),
        )?;
        let out = stdout_text("bench throughput", &o)?;
        eprintln!("bench throughput --duration 1:\n{out}");
        ensure!(
            out.contains("Gbit/s") && out.contains("cpu0"),
            "table:\n{out}"
        );

        // 4. Nobody at that address: one clear error line, soon, and no
        //    output files left behind.
        let nobody = ip(77).to_string();
        let hgrm = dir.join("failed.hgrm").to_string_lossy().into_owned();
        let plot = dir.join("failed.svg").to_string_lossy().into_owned();
        for (what, argv, want) in [
            (
                "latency to nobody",
                vec![
                    BIN, "bench", "latency", "--target", &nobody, "--count", "500", "--hgrm",
                    &hgrm, "--plot", &plot,
                ],
                "no answer from 10.0.0.77:7100",
            ),
            (
                "throughput to nobody",
                vec![
                    BIN,
                    "bench",
                    "throughput",
                    "--target",
                    &nobody,
                    "--duration",
                    "2",
                ],
                "no answer from 10.0.0.77:7101",
            ),
            (
                "latency to a closed port",
                vec![
                    BIN, "bench", "latency", "--target", &target, "--port", "7999", "--hgrm",
                    &hgrm, "--plot", &plot,
                ],
                "refused",
            ),
        ] {
            let t0 = Instant::now();
            let o = lab.exec_timeout(h1, &argv, Duration::from_secs(30))?;
            let took = t0.elapsed();
            check_clean_failure(what, &o, want)?;
            ensure!(
                !Path::new(&hgrm).exists() && !Path::new(&plot).exists(),
                "{what}: a failed run left {hgrm} or {plot} behind"
            );
            ensure!(took <= GIVE_UP, "{what}: took {took:?} to give up");
            eprintln!(
                "{what}: {} after {took:?}: {}",
                netns::describe_status(o.status),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }

        // 4b. What was at --hgrm/--plot before a failed run stays as it
        //     was: regular files, a FIFO, a character device (a copy of
        //     /dev/null made here: no test risks the real one). The bench
        //     removes only its own temporary files.
        let kept_hgrm = dir.join("kept.hgrm");
        let kept_plot = dir.join("kept.svg");
        fs::write(&kept_hgrm, "precious hgrm")?;
        fs::write(&kept_plot, "precious svg")?;
        let fifo = dir.join("out.fifo");
        mkfifo(&fifo)?;
        let null = dir.join("null");
        let device = make_null_device(&null)?;
        let before = temp_files(&dir)?;
        let mut cases = vec![("regular files", &kept_hgrm, &kept_plot)];
        if device {
            cases.push(("a FIFO and a device", &fifo, &null));
        } else {
            cases.push(("a FIFO and a regular file", &fifo, &kept_plot));
        }
        for (what, hgrm, plot) in cases {
            let (h, p) = (hgrm.to_string_lossy(), plot.to_string_lossy());
            let o = lab.exec_timeout(
                h1,
                &[
                    BIN, "bench", "latency", "--target", &nobody, "--count", "500", "--hgrm", &h,
                    "--plot", &p,
                ],
                Duration::from_secs(30),
            )?;
            check_clean_failure(what, &o, "no answer from 10.0.0.77:7100")?;
            ensure!(
                fs::read_to_string(&kept_hgrm).ok().as_deref() == Some("precious hgrm")
                    && fs::read_to_string(&kept_plot).ok().as_deref() == Some("precious svg"),
                "{what}: a failed run changed or removed {} or {}",
                kept_hgrm.display(),
                kept_plot.display()
            );
            ensure!(is_fifo(&fifo), "{what}: the FIFO is gone");
            ensure!(
                !device || is_null_device(&null),
                "{what}: the device is gone"
            );
            ensure!(
                temp_files(&dir)? == before,
                "{what}: temporary files left behind: {:?}",
                temp_files(&dir)?
            );
        }

        //     A run that succeeds writes into the FIFO and the device as they
        //     are (the device discards), and replaces a regular file.
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || fs::read_to_string(fifo))
        };
        let plot_into = if device { &null } else { &kept_plot };
        let o = lab.exec_timeout(
            h1,
            &[
                BIN,
                "bench",
                "latency",
                "--target",
                &target,
                "--count",
                "200",
                "--hgrm",
                &fifo.to_string_lossy(),
                "--plot",
                &plot_into.to_string_lossy(),
            ],
            Duration::from_secs(60),
        );
        unblock_fifo_reader(&fifo);
        let read = reader
            .join()
            .map_err(|_| anyhow!("the FIFO reader panicked"))?;
        let o = o?;
        stdout_text("bench latency into a FIFO and a device", &o)?;
        let text = read.context("reading the FIFO")?;
        let parsed = bench::parse_hgrm(&text).context("parsing the .hgrm from the FIFO")?;
        ensure!(parsed.total_count == 200, "FIFO .hgrm: {text}");
        ensure!(is_fifo(&fifo), "the FIFO is gone after a successful run");
        ensure!(!device || is_null_device(&null), "the device is gone");
        if !device {
            ensure!(
                fs::read_to_string(&kept_plot)?.contains("<svg"),
                "the regular --plot was not replaced"
            );
        }
        ensure!(temp_files(&dir)? == before, "temporary files left behind");
        // The real /dev/null is only looked at, never used.
        ensure!(
            is_null_device(Path::new("/dev/null")),
            "/dev/null is no longer the null device"
        );

        // 5. Through an edge node (behind a NAT, so `--role auto` makes it
        //    one): its overlay traffic rides a TCP link to its core node
        //    10.0.0.2, which relays. Both directions.
        let router = lab.add_nat_router("router")?;
        let h3 = lab.add_host_behind("en1", router)?;
        let (en, st) = lab.start_node(h3, &NodeSpec::new(&key).addr(ip(3)).bootstrap(n2.listen))?;
        ensure!(
            netns::role(&st) == "edge",
            "the NATed node is not an edge node: {st}"
        );
        lab.wait_status(&en, CONVERGE, "primary 10.0.0.2", |st| {
            netns::primary(st) == Some(ip(2))
        })?;
        lab.wait_converged(&[&n1, &n2, &en], 3, CONVERGE)?;
        for (from, name, to) in [(h1, "node1", ip(3)), (h3, "en1", ip(1))] {
            let to_s = to.to_string();
            let o = lab.exec_timeout(
                from,
                &[
                    BIN, "bench", "latency", "--target", &to_s, "--count", "200", "--json",
                    "--hgrm", &hgrm, "--plot", &plot,
                ],
                Duration::from_secs(60),
            )?;
            let v = stdout_json(&format!("bench latency {name} -> {to}"), &o)?;
            ensure!(v["count"] == 200 && v["lost"] == 0, "{name} -> {to}: {v}");
            eprintln!(
                "{name} -> {to} (edge node, relayed by 10.0.0.2): p50 {} µs, p99 {} µs, max {} µs",
                v["p50_us"], v["p99_us"], v["max_us"]
            );
        }

        // 6. The node stops its responders and exits cleanly.
        lab.kill(n2.pid, libc::SIGTERM);
        let st = lab
            .wait_exit(n2.pid, Duration::from_secs(5))
            .ok_or_else(|| anyhow!("node2 still runs 5 s after SIGTERM"))?;
        ensure!(st.success(), "node2 exited {}", netns::describe_status(st));
        let log = fs::read_to_string(&n2.log)?;
        ensure!(
            log.contains("bench responders up"),
            "node2 did not start its responders:\n{log}"
        );
        Ok(())
    });
}
