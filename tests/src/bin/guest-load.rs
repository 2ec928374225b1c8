//! Workloads for the guest tests, each a plain process the agent places and limits:
//!   `spin <secs>`            busy loop for <secs> of wall time
//!   `touch <MiB> [secs]`     allocate and touch <MiB>, print `touched`, hold it <secs>
//!   `forkbomb <n> <secs>`    fork up to <n> sleeping children; print `forked <k> errno <e>`
//!   `become <uid> <secs>`    wait for a line on stdin, setuid(<uid>), print `became`, sleep
//!   `sleep <secs>`
//! A leading `wait` holds any workload until a line arrives on stdin (so the test can
//! start measuring once the agent has placed the process).
use std::{
    io::{BufRead, Write},
    time::{Duration, Instant},
};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("wait") {
        args.remove(0);
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).unwrap();
    }
    let num = |i: usize| -> u64 {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .expect("numeric argument")
    };
    match args.first().map(String::as_str) {
        Some("spin") => {
            let end = Instant::now() + Duration::from_secs(num(1));
            let mut x: u64 = 0;
            while Instant::now() < end {
                for i in 0..10_000u64 {
                    x = x.wrapping_mul(31).wrapping_add(i);
                }
                std::hint::black_box(x);
            }
        }
        Some("touch") => {
            let mib = num(1) as usize;
            let mut chunks: Vec<Vec<u8>> = Vec::new();
            for _ in 0..mib {
                let mut chunk = vec![0u8; 1 << 20];
                for page in chunk.chunks_mut(4096) {
                    page[0] = 1;
                }
                chunks.push(chunk);
            }
            println!("touched {}", chunks.len());
            std::io::stdout().flush().unwrap();
            // Optionally hold the memory (for alerts on usage).
            if let Some(secs) = args.get(2).and_then(|a| a.parse().ok()) {
                std::thread::sleep(Duration::from_secs(secs));
            }
            drop(chunks);
        }
        Some("forkbomb") => {
            let (n, secs) = (num(1), num(2));
            let mut forked = 0;
            let mut errno = 0;
            for _ in 0..n {
                // SAFETY: this process has one thread; the child only sleeps and exits.
                match unsafe { nix::unistd::fork() } {
                    Ok(nix::unistd::ForkResult::Child) => {
                        std::thread::sleep(Duration::from_secs(secs));
                        // SAFETY: leaves without running the parent's atexit handlers (nix
                        // has no _exit).
                        unsafe { libc::_exit(0) };
                    }
                    Err(e) => {
                        errno = e as i32;
                        break;
                    }
                    Ok(nix::unistd::ForkResult::Parent { .. }) => forked += 1,
                }
            }
            println!("forked {forked} errno {errno}");
            std::io::stdout().flush().unwrap();
            // Reaps the children until none is left.
            while nix::sys::wait::wait().is_ok() {}
        }
        Some("become") => {
            let (uid, secs) = (num(1) as u32, num(2));
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).unwrap();
            nix::unistd::setgid(nix::unistd::Gid::from_raw(uid)).expect("setgid");
            nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).expect("setuid");
            println!("became");
            std::io::stdout().flush().unwrap();
            std::thread::sleep(Duration::from_secs(secs));
        }
        Some("sleep") => std::thread::sleep(Duration::from_secs(num(1))),
        _ => {
            eprintln!("usage: guest-load spin|touch|forkbomb|become|sleep ...");
            std::process::exit(2);
        }
    }
}
