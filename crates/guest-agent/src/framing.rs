//! Cutting the byte stream from the host into JSON requests.
//!
//! The QEMU guest agent protocol is a stream of JSON objects with no framing
//! of its own: clients usually end each request with a newline, but need
//! not. So, like qemu-ga's JSON streamer, the [`Splitter`] tracks nesting
//! depth (outside of strings) and hands out an object when its closing brace
//! arrives.
//!
//! Two extra rules come from the protocol:
//! * A `0xFF` byte resets the parser. It can never occur in UTF-8 JSON, so a
//!   client sends it before `guest-sync-delimited` to discard whatever half
//!   request a previous client left behind.
//! * Anything else outside an object is not a request; the bytes up to the
//!   next newline are reported as [`Frame::Invalid`], so the client gets an
//!   error reply instead of silence.

/// The largest request we buffer: a `guest-file-write` of 48 MiB in base64,
/// with room to spare.
pub const MAX_REQUEST: usize = 72 << 20;

const RESET: u8 = 0xFF;

/// What the stream yielded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The bytes of one complete JSON object or array.
    Message(Vec<u8>),
    /// Bytes outside any object, up to a newline.
    Invalid(Vec<u8>),
    /// A request longer than [`MAX_REQUEST`]; it is skipped up to the next
    /// newline or reset byte.
    TooLarge,
}

#[derive(Debug, Default)]
pub struct Splitter {
    buf: Vec<u8>,
    state: State,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between requests, skipping whitespace.
    #[default]
    Idle,
    /// Inside an object or array nested `depth` deep.
    Value { depth: u32, in_string: bool, escaped: bool },
    /// Collecting bytes that cannot start a request, up to a newline.
    Garbage,
    /// Dropping the rest of an oversized request.
    Discarding,
}

impl Splitter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets any partial request: a new client may be talking now.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.state = State::Idle;
    }

    /// Feeds bytes from the stream and returns the frames they completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        for &b in bytes {
            if b == RESET {
                if self.state == State::Garbage && !self.buf.is_empty() {
                    frames.push(Frame::Invalid(std::mem::take(&mut self.buf)));
                }
                self.reset();
                continue;
            }
            match self.state {
                State::Idle => match b {
                    b' ' | b'\t' | b'\r' | b'\n' => {}
                    b'{' | b'[' => {
                        self.buf.push(b);
                        self.state = State::Value { depth: 1, in_string: false, escaped: false };
                    }
                    _ => {
                        self.buf.push(b);
                        self.state = State::Garbage;
                    }
                },
                State::Garbage => {
                    if b == b'\n' {
                        frames.push(Frame::Invalid(std::mem::take(&mut self.buf)));
                        self.state = State::Idle;
                    } else if self.buf.len() < 256 {
                        // Enough to show in an error message.
                        self.buf.push(b);
                    }
                }
                State::Discarding => {
                    if b == b'\n' {
                        self.state = State::Idle;
                    }
                }
                State::Value { depth, in_string, escaped } => {
                    if self.buf.len() >= MAX_REQUEST {
                        self.buf = Vec::new();
                        self.state = State::Discarding;
                        frames.push(Frame::TooLarge);
                        continue;
                    }
                    self.buf.push(b);
                    self.state = match (in_string, escaped, b) {
                        (true, true, _) => State::Value { depth, in_string: true, escaped: false },
                        (true, false, b'\\') => State::Value { depth, in_string: true, escaped: true },
                        (true, false, b'"') => State::Value { depth, in_string: false, escaped: false },
                        (true, false, _) => State::Value { depth, in_string: true, escaped: false },
                        (false, _, b'"') => State::Value { depth, in_string: true, escaped: false },
                        (false, _, b'{' | b'[') => State::Value { depth: depth + 1, in_string: false, escaped: false },
                        (false, _, b'}' | b']') if depth == 1 => {
                            frames.push(Frame::Message(std::mem::take(&mut self.buf)));
                            State::Idle
                        }
                        (false, _, b'}' | b']') => State::Value { depth: depth - 1, in_string: false, escaped: false },
                        (false, _, _) => State::Value { depth, in_string: false, escaped: false },
                    };
                }
            }
        }
        frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(frames: Vec<Frame>) -> Vec<String> {
        frames
            .into_iter()
            .map(|f| match f {
                Frame::Message(m) => String::from_utf8_lossy(&m).into_owned(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn objects_are_cut_at_their_closing_brace_whatever_the_chunking() {
        let stream = br#"{"execute":"guest-ping"}
{"execute": "guest-sync", "arguments": {"id": 7}}{"execute":"x","arguments":{"s":"}{\"\\"}}"#;
        let expected = vec![
            r#"{"execute":"guest-ping"}"#.to_owned(),
            r#"{"execute": "guest-sync", "arguments": {"id": 7}}"#.to_owned(),
            r#"{"execute":"x","arguments":{"s":"}{\"\\"}}"#.to_owned(),
        ];
        assert_eq!(messages(Splitter::new().push(stream)), expected);
        // One byte at a time gives the same.
        let mut s = Splitter::new();
        let mut frames = Vec::new();
        for b in stream {
            frames.extend(s.push(std::slice::from_ref(b)));
        }
        assert_eq!(messages(frames), expected);
    }

    #[test]
    fn the_reset_byte_discards_a_partial_request() {
        let mut s = Splitter::new();
        assert!(s.push(br#"{"execute": "guest-pi"#).is_empty());
        let frames = s.push(b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":1}}\n");
        assert_eq!(messages(frames), vec![r#"{"execute":"guest-sync-delimited","arguments":{"id":1}}"#]);
    }

    #[test]
    fn bytes_outside_an_object_are_reported_up_to_the_newline() {
        let mut s = Splitter::new();
        let frames = s.push(b"hello there\n{\"a\":1}");
        assert_eq!(frames[0], Frame::Invalid(b"hello there".to_vec()));
        assert_eq!(frames[1], Frame::Message(b"{\"a\":1}".to_vec()));
    }

    #[test]
    fn an_oversized_request_is_skipped_up_to_the_newline() {
        let mut s = Splitter::new();
        let mut big = b"{\"x\":\"".to_vec();
        big.resize(MAX_REQUEST + 10, b'a');
        big.extend_from_slice(b"\"}\n{\"b\":2}");
        let frames = s.push(&big);
        assert_eq!(frames, vec![Frame::TooLarge, Frame::Message(b"{\"b\":2}".to_vec())]);
    }
}
