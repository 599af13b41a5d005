//! The control stream between two gateways (`SPEC.md` §Control stream).
//!
//! Each side writes an 8-byte preface — magic `CWAY`, protocol version (u16, big-endian), two reserved
//! zero bytes — then frames: a u32 big-endian body length followed by a postcard-encoded [`Message`].
//! [`Decoder`] is sans-IO: feed it bytes as they arrive, pull events out. It refuses an oversized frame
//! as soon as the length prefix is seen, before buffering the body, and refuses trailing bytes after a
//! message. Wire types are non-recursive (postcard has no depth limit) and frozen for version 1:
//! postcard has no field tags, so an appended field is trailing bytes to a v1 peer, which refuses it.
//! Extensions are new messages sent only to a peer whose hello set their feature bit (`SPEC.md` §4.7).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::codes::ErrorCode;
use crate::limits::{MAX_CONTROL_FRAME_LEN, MAX_LABELS, MAX_LABEL_LEN, MAX_REASON_LEN, MAX_SERVICES_PER_FRAME};
use crate::names::{GatewayId, ServiceName, ZoneName};

pub const MAGIC: [u8; 4] = *b"CWAY";
/// The protocol version this build speaks. Peers must match exactly; see `SPEC.md` §4.7 (versioning).
pub const VERSION: u16 = 1;
pub const PREFACE_LEN: usize = 8;
const LEN_PREFIX: usize = 4;

/// Feature bits a gateway advertises in its hello. Unknown bits are ignored. A bit is the extension
/// point of version 1: it gates an extension's messages (`SPEC.md` §4.7).
pub mod features {
    /// The sender can open flows toward the dialing side on server-initiated streams (`SPEC.md` §Roles).
    pub const REVERSE_REQUESTS: u64 = 1 << 0;
    /// The sender takes part in mesh-wide documents: `Document` and `DocumentStatus` messages
    /// (`SPEC.md` §4.8).
    pub const DOCUMENTS: u64 = 1 << 1;
}

pub fn preface(version: u16) -> [u8; PREFACE_LEN] {
    let v = version.to_be_bytes();
    [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], v[0], v[1], 0, 0]
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message on the stream, both directions.
    Hello(Hello),
    /// One chunk of the sender's full catalog; a snapshot ends with the chunk whose `more` is false.
    Catalog(Catalog),
    /// A service was added or changed.
    ServiceUpdate(ServiceUpdate),
    /// A service is no longer offered.
    ServiceWithdraw(ServiceWithdraw),
    /// The sender's load and state.
    Load(Load),
    Ping(Ping),
    Pong(Ping),
    /// The sender is draining: route new flows elsewhere.
    Goodbye(Goodbye),
    /// The sender refuses something; the connection is closed with the same code right after.
    Error(ErrorMsg),
    /// A mesh-wide document (feature [`features::DOCUMENTS`]).
    Document(crate::document::SignedDocument),
    /// A gateway's report of the document it runs (feature [`features::DOCUMENTS`]).
    DocumentStatus(crate::document::DocumentStatus),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub zone: ZoneName,
    pub gateway: GatewayId,
    /// Bit set of [`features`].
    pub features: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Http,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAd {
    pub name: ServiceName,
    pub protocol: Protocol,
    pub port: u16,
    /// Endpoints the sender currently considers healthy; 0 means "known but unavailable".
    pub healthy_endpoints: u32,
    pub labels: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    /// The sender's catalog version this snapshot reflects.
    pub version: u64,
    pub services: Vec<ServiceAd>,
    pub more: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceUpdate {
    pub version: u64,
    pub service: ServiceAd,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceWithdraw {
    pub version: u64,
    pub name: ServiceName,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    pub active_flows: u32,
    pub draining: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    pub nonce: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goodbye {
    /// How long the sender keeps existing flows open, in milliseconds.
    pub drain_ms: u32,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    pub code: ErrorCode,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bad preface magic")]
    BadMagic,
    #[error("peer speaks protocol version {theirs}, this gateway speaks {VERSION}")]
    Version { theirs: u16 },
    #[error("frame of {len} bytes exceeds the {MAX_CONTROL_FRAME_LEN}-byte limit")]
    Oversized { len: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("limit exceeded: {0}")]
    Limit(&'static str),
}

impl DecodeError {
    /// The error code this failure is reported with.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::BadMagic | DecodeError::Malformed(_) | DecodeError::Trailing(_) => {
                ErrorCode::CONTROL_MALFORMED
            }
            DecodeError::Version { .. } => ErrorCode::VERSION_MISMATCH,
            DecodeError::Oversized { .. } => ErrorCode::CONTROL_OVERSIZED,
            DecodeError::Truncated => ErrorCode::CONTROL_TRUNCATED,
            DecodeError::Limit(_) => ErrorCode::LIMIT_EXCEEDED,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("message of {len} bytes exceeds the {MAX_CONTROL_FRAME_LEN}-byte frame limit")]
    Oversized { len: usize },
    #[error("encoding failed: {0}")]
    Postcard(String),
}

/// Encodes one frame: length prefix and body.
pub fn encode(msg: &Message) -> Result<Bytes, EncodeError> {
    let body = postcard::to_stdvec(msg).map_err(|e| EncodeError::Postcard(e.to_string()))?;
    if body.len() > MAX_CONTROL_FRAME_LEN {
        return Err(EncodeError::Oversized { len: body.len() });
    }
    let mut out = BytesMut::with_capacity(LEN_PREFIX + body.len());
    out.put_u32(body.len() as u32);
    out.put_slice(&body);
    Ok(out.freeze())
}

/// Decodes one frame body (without the length prefix), refusing trailing bytes and checking the
/// limits serde cannot express.
pub fn decode_body(body: &[u8]) -> Result<Message, DecodeError> {
    let (msg, rest) = postcard::take_from_bytes::<Message>(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    check_limits(&msg)?;
    Ok(msg)
}

fn check_ad(ad: &ServiceAd) -> Result<(), DecodeError> {
    if ad.labels.len() > MAX_LABELS {
        return Err(DecodeError::Limit("too many labels"));
    }
    if ad.labels.iter().any(|(k, v)| k.len() > MAX_LABEL_LEN || v.len() > MAX_LABEL_LEN) {
        return Err(DecodeError::Limit("label too long"));
    }
    Ok(())
}

fn check_limits(msg: &Message) -> Result<(), DecodeError> {
    match msg {
        Message::Catalog(c) => {
            if c.services.len() > MAX_SERVICES_PER_FRAME {
                return Err(DecodeError::Limit("too many services in one catalog frame"));
            }
            c.services.iter().try_for_each(check_ad)
        }
        Message::ServiceUpdate(u) => check_ad(&u.service),
        Message::Goodbye(Goodbye { reason, .. })
        | Message::Error(ErrorMsg { reason, .. })
        | Message::DocumentStatus(crate::document::DocumentStatus { reason, .. })
            if reason.len() > MAX_REASON_LEN =>
        {
            Err(DecodeError::Limit("reason too long"))
        }
        Message::Document(d) => d.check().map_err(|e| match e {
            crate::document::DocumentError::Oversized(what) => DecodeError::Limit(what),
            crate::document::DocumentError::Malformed(_) => DecodeError::Limit("document"),
        }),
        _ => Ok(()),
    }
}

/// What the decoder produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer's preface matched this version.
    Preface,
    Message(Message),
}

/// Incremental, sans-IO decoder for one direction of a control stream.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
    saw_preface: bool,
    failed: bool,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes and refuses a frame whose declared length is over the limit as soon as
    /// its length prefix is here, before its body is buffered. The caller drains [`Self::next_event`]
    /// after each feed, so the buffer holds at most one partial frame plus one transport read.
    pub fn feed(&mut self, mut data: impl Buf) -> Result<(), DecodeError> {
        if self.failed {
            return Err(DecodeError::Malformed("decoder already failed".into()));
        }
        while data.has_remaining() {
            let n = data.chunk().len();
            self.buf.extend_from_slice(data.chunk());
            data.advance(n);
        }
        self.check_header()
    }

    fn fail<T>(&mut self, e: DecodeError) -> Result<T, DecodeError> {
        self.failed = true;
        Err(e)
    }

    /// Bytes the next item needs in total.
    fn need(&self) -> usize {
        if !self.saw_preface {
            return PREFACE_LEN;
        }
        if self.buf.len() < LEN_PREFIX {
            return LEN_PREFIX;
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        LEN_PREFIX + len
    }

    fn check_header(&mut self) -> Result<(), DecodeError> {
        if !self.saw_preface {
            let n = self.buf.len().min(MAGIC.len());
            if self.buf[..n] != MAGIC[..n] {
                return self.fail(DecodeError::BadMagic);
            }
            return Ok(());
        }
        if self.buf.len() >= LEN_PREFIX {
            let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
            if len > MAX_CONTROL_FRAME_LEN {
                return self.fail(DecodeError::Oversized { len });
            }
        }
        Ok(())
    }

    /// The next complete event, if one is buffered.
    pub fn next_event(&mut self) -> Result<Option<Event>, DecodeError> {
        if self.failed {
            return Ok(None);
        }
        if !self.saw_preface {
            if self.buf.len() < PREFACE_LEN {
                return Ok(None);
            }
            let p = self.buf.split_to(PREFACE_LEN);
            if p[..4] != MAGIC {
                return self.fail(DecodeError::BadMagic);
            }
            let theirs = u16::from_be_bytes([p[4], p[5]]);
            if theirs != VERSION {
                return self.fail(DecodeError::Version { theirs });
            }
            self.saw_preface = true;
            self.check_header()?;
            return Ok(Some(Event::Preface));
        }
        if self.buf.len() < LEN_PREFIX {
            return Ok(None);
        }
        self.check_header()?;
        let need = self.need();
        if self.buf.len() < need {
            return Ok(None);
        }
        let frame = self.buf.split_to(need);
        match decode_body(&frame[LEN_PREFIX..]) {
            Ok(m) => {
                self.check_header()?;
                Ok(Some(Event::Message(m)))
            }
            Err(e) => self.fail(e),
        }
    }

    /// Whether part of a preface or frame is buffered (a frame has started and not finished).
    pub fn pending(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Called at end of stream: refuses a stream that ended inside the preface or a frame.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if !self.saw_preface || !self.buf.is_empty() {
            return Err(DecodeError::Truncated);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Message {
        Message::Hello(Hello {
            zone: ZoneName::new("eu").unwrap(),
            gateway: GatewayId::new("gw-1").unwrap(),
            features: features::REVERSE_REQUESTS,
        })
    }

    fn stream_of(msgs: &[Message]) -> Vec<u8> {
        let mut v = preface(VERSION).to_vec();
        for m in msgs {
            v.extend_from_slice(&encode(m).unwrap());
        }
        v
    }

    fn drain(d: &mut Decoder) -> Result<Vec<Event>, DecodeError> {
        let mut out = vec![];
        while let Some(e) = d.next_event()? {
            out.push(e);
        }
        Ok(out)
    }

    #[test]
    fn round_trips_byte_by_byte() {
        let msgs = vec![
            hello(),
            Message::Catalog(Catalog {
                version: 7,
                services: vec![ServiceAd {
                    name: ServiceName::new("orders.shop").unwrap(),
                    protocol: Protocol::Tcp,
                    port: 8080,
                    healthy_endpoints: 2,
                    labels: vec![("version".into(), "v2".into())],
                }],
                more: false,
            }),
            Message::Ping(Ping { nonce: 9 }),
            Message::Goodbye(Goodbye { drain_ms: 5000, reason: "shutdown".into() }),
        ];
        let bytes = stream_of(&msgs);
        let mut d = Decoder::new();
        let mut events = vec![];
        for b in bytes {
            d.feed(&[b][..]).unwrap();
            events.extend(drain(&mut d).unwrap());
        }
        d.finish().unwrap();
        assert_eq!(events[0], Event::Preface);
        let got: Vec<_> = events[1..]
            .iter()
            .map(|e| match e {
                Event::Message(m) => m.clone(),
                Event::Preface => panic!("second preface"),
            })
            .collect();
        assert_eq!(got, msgs);
    }

    #[test]
    fn refuses_version_mismatch() {
        let mut d = Decoder::new();
        d.feed(&preface(2)[..]).unwrap();
        assert_eq!(d.next_event(), Err(DecodeError::Version { theirs: 2 }));
        assert_eq!(DecodeError::Version { theirs: 2 }.code(), ErrorCode::VERSION_MISMATCH);
    }

    #[test]
    fn refuses_bad_magic_at_first_byte() {
        let mut d = Decoder::new();
        assert_eq!(d.feed(&b"G"[..]), Err(DecodeError::BadMagic));
    }

    #[test]
    fn refuses_oversized_before_buffering() {
        let mut d = Decoder::new();
        d.feed(&preface(VERSION)[..]).unwrap();
        assert_eq!(d.next_event(), Ok(Some(Event::Preface)));
        let len = (MAX_CONTROL_FRAME_LEN as u32 + 1).to_be_bytes();
        assert_eq!(d.feed(&len[..]), Err(DecodeError::Oversized { len: MAX_CONTROL_FRAME_LEN + 1 }));
        assert!(d.buf.len() <= LEN_PREFIX);
    }

    #[test]
    fn refuses_trailing_bytes() {
        let body = postcard::to_stdvec(&Message::Ping(Ping { nonce: 1 })).unwrap();
        let mut framed = preface(VERSION).to_vec();
        framed.extend_from_slice(&((body.len() + 2) as u32).to_be_bytes());
        framed.extend_from_slice(&body);
        framed.extend_from_slice(&[0, 0]);
        let mut d = Decoder::new();
        d.feed(&framed[..]).unwrap();
        assert_eq!(drain(&mut d), Err(DecodeError::Trailing(2)));
    }

    #[test]
    fn refuses_truncation() {
        let bytes = stream_of(&[hello()]);
        let mut d = Decoder::new();
        d.feed(&bytes[..bytes.len() - 1]).unwrap();
        drain(&mut d).unwrap();
        assert_eq!(d.finish(), Err(DecodeError::Truncated));
    }

    #[test]
    fn refuses_bad_names_inside_messages() {
        let mut body = postcard::to_stdvec(&hello()).unwrap();
        // The zone name's first byte (after variant tag and length) becomes uppercase.
        body[2] = b'E';
        assert!(matches!(decode_body(&body), Err(DecodeError::Malformed(_))));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data: Vec<u8>, split in 0usize..64) {
            let mut d = Decoder::new();
            let split = split.min(data.len());
            let _ = d.feed(&data[..split]).and_then(|_| drain(&mut d).map(|_| ()));
            let _ = d.feed(&data[split..]).and_then(|_| drain(&mut d).map(|_| ()));
            let _ = d.finish();
            let _ = decode_body(&data);
        }

        #[test]
        fn arbitrary_frames_after_preface_never_panic(body: Vec<u8>) {
            let mut bytes = preface(VERSION).to_vec();
            bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
            bytes.extend_from_slice(&body);
            let mut d = Decoder::new();
            let _ = d.feed(&bytes[..]).and_then(|_| drain(&mut d).map(|_| ()));
        }
    }
}
