//! A delay line between two network namespaces: a TUN device in each, IP packets copied between them
//! in user space after a configurable one-way delay.
//!
//! The kernel here has no `netem`. A UDP relay would delay only the QUIC arms; this delays TCP and
//! QUIC alike, packet by packet, so the HAProxy pair and the overlay see the same path (same MTU,
//! same delay, no TCP termination in the middle that would hide the RTT from TCP's windows).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `_IOW('T', 202, int)`.
const TUNSETIFF: u64 = 0x4004_54ca;
/// Packets in flight per direction, like a router's buffer: 16,384 × 1,500 B ≈ 25 MB, the
/// bandwidth-delay product of 4 Gbit/s at 50 ms (more than this line carries), so the line is not
/// the window; more would only add queueing delay (bufferbloat) for loss-based senders.
const QUEUE_PACKETS: usize = 16_384;
/// Packets due within this much are written at once: thread sleeps cost ~60 µs of timer slack each,
/// and sleeping per packet would cap the line at ~16k packets per second.
const EARLY: Duration = Duration::from_micros(200);

/// Opens a new TUN device (layer 3, no packet information header) named `name`.
#[allow(unsafe_code)]
pub fn open_tun(name: &str) -> std::io::Result<File> {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    if name.len() >= 16 {
        return Err(std::io::Error::other("interface name longer than 15 bytes"));
    }
    let f = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    let mut req = IfReq { name: [0; 16], flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq` (40 bytes, the layout above), which lives
    // on this stack frame for the whole call; the fd is open.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

/// The running line; its delay can change while connections run over it.
pub struct Wire {
    one_way_us: Arc<AtomicU64>,
}

impl Wire {
    /// Starts copying packets both ways between two open TUN devices.
    pub fn start(a: File, b: File) -> std::io::Result<Self> {
        let one_way_us = Arc::new(AtomicU64::new(0));
        pump(a.try_clone()?, b.try_clone()?, one_way_us.clone());
        pump(b, a, one_way_us.clone());
        Ok(Self { one_way_us })
    }

    /// Sets the round-trip time the line adds (half of it in each direction).
    pub fn set_rtt(&self, rtt: Duration) {
        self.one_way_us.store((rtt / 2).as_micros() as u64, Ordering::Relaxed);
    }
}

fn pump(mut from: File, mut to: File, one_way_us: Arc<AtomicU64>) {
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Instant, Vec<u8>)>(QUEUE_PACKETS);
    std::thread::spawn(move || loop {
        let mut buf = vec![0u8; 2048];
        let n = match from.read(&mut buf) {
            Ok(n) => n,
            Err(_) => return,
        };
        buf.truncate(n);
        let due = Instant::now() + Duration::from_micros(one_way_us.load(Ordering::Relaxed));
        if tx.send((due, buf)).is_err() {
            return;
        }
    });
    std::thread::spawn(move || {
        for (due, pkt) in rx {
            let now = Instant::now();
            if due > now + EARLY {
                std::thread::sleep(due - now);
            }
            // A full device queue drops the packet, as a router would.
            let _ = to.write(&pkt);
        }
    });
}
