//! HTTP/3 frame-length guard. h3 0.0.8 buffers a non-DATA frame until it is complete, without a cap:
//! a peer declaring a 1 TiB HEADERS, SETTINGS or reserved-type frame could make a gateway buffer as
//! much as it sends. The guard watches the bytes between quinn and h3 (without copying or changing
//! them), parses each frame header (RFC 9114 §7.1: type and length varints), and refuses a frame whose
//! declared length is over its type's limit before h3 buffers its payload. Sans-IO.

/// HTTP/3 frame types (RFC 9114 §7.2).
const DATA: u64 = 0x0;
const HEADERS: u64 = 0x1;
const SETTINGS: u64 = 0x4;

/// Largest HEADERS (or trailers) frame: the field-section limit we advertise, 64 KiB.
pub const MAX_HEADERS: u64 = 64 * 1024;
/// Largest SETTINGS frame: a few dozen settings take well under 1 KiB.
pub const MAX_SETTINGS: u64 = 16 * 1024;
/// Largest frame of any other type (GOAWAY, MAX_PUSH_ID, reserved and unknown types).
pub const MAX_OTHER: u64 = 4 * 1024;

/// What a stream carries, which decides what the guard checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// A bidirectional request stream: frames from the first byte.
    Request,
    /// A unidirectional stream whose type varint has not been read yet.
    Unidirectional,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a unidirectional stream's type.
    UniType,
    /// Reading a frame header.
    Header,
    /// Inside a frame's payload.
    Payload(u64),
    /// A stream without HTTP/3 frames (QPACK encoder/decoder, unknown types): not inspected; h3
    /// stops unknown types, and QPACK instructions are bounded by the table capacity (0 here).
    Opaque,
}

/// Why a frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Oversized {
    pub frame_type: u64,
    pub length: u64,
    pub limit: u64,
    /// Whether the stream is the HTTP/3 control stream (refusing it ends the connection).
    pub control: bool,
}

#[derive(Debug, Clone)]
pub struct FrameGuard {
    state: State,
    control: bool,
    header: [u8; 16],
    have: usize,
}

fn varint(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    if buf.len() < len {
        return None;
    }
    let mut v = u64::from(first & 0x3f);
    for b in &buf[1..len] {
        v = (v << 8) | u64::from(*b);
    }
    Some((v, len))
}

impl FrameGuard {
    pub fn new(kind: StreamKind) -> Self {
        let state = match kind {
            StreamKind::Request => State::Header,
            StreamKind::Unidirectional => State::UniType,
        };
        Self { state, control: false, header: [0; 16], have: 0 }
    }

    fn limit(&self, frame_type: u64) -> u64 {
        match (self.control, frame_type) {
            (false, DATA) => u64::MAX,
            (false, HEADERS) => MAX_HEADERS,
            (true, SETTINGS) => MAX_SETTINGS,
            _ => MAX_OTHER,
        }
    }

    /// Inspects the next bytes of the stream, in order.
    pub fn inspect(&mut self, mut data: &[u8]) -> Result<(), Oversized> {
        while !data.is_empty() {
            match self.state {
                State::Opaque => return Ok(()),
                State::Payload(remaining) => {
                    let n = remaining.min(data.len() as u64);
                    data = &data[n as usize..];
                    self.state = if remaining == n { State::Header } else { State::Payload(remaining - n) };
                }
                State::UniType | State::Header => {
                    self.header[self.have] = data[0];
                    self.have += 1;
                    data = &data[1..];
                    let buf = &self.header[..self.have];
                    if self.state == State::UniType {
                        if let Some((ty, _)) = varint(buf) {
                            self.have = 0;
                            // Stream type 0x00 is the control stream (RFC 9114 §6.2.1).
                            self.control = ty == 0;
                            self.state = if self.control { State::Header } else { State::Opaque };
                        }
                        continue;
                    }
                    let Some((ty, l1)) = varint(buf) else { continue };
                    let Some((len, _)) = varint(&buf[l1..]) else { continue };
                    self.have = 0;
                    let limit = self.limit(ty);
                    if len > limit {
                        return Err(Oversized { frame_type: ty, length: len, limit, control: self.control });
                    }
                    self.state = if len == 0 { State::Header } else { State::Payload(len) };
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: u64) -> Vec<u8> {
        match v {
            0..=63 => vec![v as u8],
            64..=16383 => ((v as u16) | 0x4000).to_be_bytes().to_vec(),
            16384..=1_073_741_823 => ((v as u32) | 0x8000_0000).to_be_bytes().to_vec(),
            _ => (v | 0xc000_0000_0000_0000).to_be_bytes().to_vec(),
        }
    }

    fn frame(ty: u64, len: u64, payload: bool) -> Vec<u8> {
        let mut f = enc(ty);
        f.extend(enc(len));
        if payload {
            f.extend(std::iter::repeat_n(0u8, len as usize));
        }
        f
    }

    #[test]
    fn passes_normal_request_streams_byte_by_byte() {
        let mut s = frame(HEADERS, 300, true);
        s.extend(frame(DATA, 70_000, true));
        s.extend(frame(0x21, 10, true)); // a reserved (grease) type, small
        s.extend(frame(HEADERS, 20, true)); // trailers
        let mut g = FrameGuard::new(StreamKind::Request);
        for b in &s {
            g.inspect(&[*b]).unwrap();
        }
        let mut g = FrameGuard::new(StreamKind::Request);
        g.inspect(&s).unwrap();
    }

    #[test]
    fn refuses_a_huge_headers_frame_from_its_header_alone() {
        let mut g = FrameGuard::new(StreamKind::Request);
        let e = g.inspect(&frame(HEADERS, 1 << 40, false)).unwrap_err();
        assert_eq!((e.frame_type, e.length, e.control), (HEADERS, 1 << 40, false));
        let mut g = FrameGuard::new(StreamKind::Request);
        assert!(g.inspect(&frame(0x2f, 1 << 40, false)).is_err(), "reserved types are capped too");
        let mut g = FrameGuard::new(StreamKind::Request);
        g.inspect(&frame(DATA, 1 << 40, false)).unwrap();
    }

    #[test]
    fn guards_the_control_stream_only() {
        let mut control = enc(0x00);
        control.extend(frame(SETTINGS, 1 << 40, false));
        let e = FrameGuard::new(StreamKind::Unidirectional).inspect(&control).unwrap_err();
        assert!(e.control);
        let mut ok = enc(0x00);
        ok.extend(frame(SETTINGS, 12, true));
        FrameGuard::new(StreamKind::Unidirectional).inspect(&ok).unwrap();
        // A QPACK encoder stream carries instructions, not frames.
        let mut qpack = enc(0x02);
        qpack.extend([0xff; 64]);
        FrameGuard::new(StreamKind::Unidirectional).inspect(&qpack).unwrap();
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data: Vec<u8>, split in 0usize..64) {
            for kind in [StreamKind::Request, StreamKind::Unidirectional] {
                let mut g = FrameGuard::new(kind);
                let split = split.min(data.len());
                if g.inspect(&data[..split]).is_ok() {
                    let _ = g.inspect(&data[split..]);
                }
            }
        }
    }
}
