//! Loopback ports for servers the tests start as child processes (tansu, Prometheus,
//! Alertmanager), without port races.
//!
//! Such a server takes a port number, not a listener we could hand it. A port probed free can be
//! taken by a parallel test before the server binds it, so [`spawn_listening`] checks that the
//! child itself holds the listening socket (through /proc), and starts it again on another port
//! when it exited or someone else got there first. Our own daemon needs none of this: it binds
//! `127.0.0.1:0` and logs the address it got.
#![allow(dead_code)]

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}

/// Whether process `pid` holds a listening TCP socket on `port`: the socket's inode (from
/// /proc/net/tcp) among the process's file descriptors.
pub fn listens_on(pid: u32, port: u16) -> bool {
    let sockets: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let cols: Vec<&str> = line.split_whitespace().collect();
                    let local_port = cols.get(1)?.rsplit(':').next()?;
                    let listening = *cols.get(3)? == "0A";
                    (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                        .then(|| format!("socket:[{}]", cols.get(9).unwrap_or(&"")))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|link| sockets.iter().any(|s| link.as_os_str() == s.as_str()))
}

/// Starts a server with `spawn(port)` until it listens on its port (up to five ports, each
/// given `deadline` to come up); returns the child and the port. `log`, where the server writes
/// its output, is quoted if it never comes up.
pub fn spawn_listening(
    what: &str,
    deadline: Duration,
    log: Option<&Path>,
    mut spawn: impl FnMut(u16) -> Child,
) -> (Child, u16) {
    let tail = || {
        let text = log
            .and_then(|l| std::fs::read_to_string(l).ok())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    };
    for _ in 0..5 {
        let port = free_port();
        let mut child = spawn(port);
        let until = Instant::now() + deadline;
        loop {
            if listens_on(child.id(), port) {
                return (child, port);
            }
            if child.try_wait().expect("the child's status").is_some() {
                break; // it could not bind (taken in a race): another port
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{what} did not listen on port {port} within {deadline:?}\n{}",
                    tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!(
        "{what} exited before listening, on five ports in a row\n{}",
        tail()
    )
}
