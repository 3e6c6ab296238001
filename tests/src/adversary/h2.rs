//! HTTP/2 by hand (cleartext, prior knowledge): the connection preface, SETTINGS, HEADERS
//! with a literal HPACK block (no Huffman, no indexing), DATA, RST_STREAM and the frames a
//! server sends back. Written out rather than taken from a library because the adversary
//! needs what a library will not do: reset a stream at a chosen moment, stop mid-body, drop
//! the connection with streams open.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// RST_STREAM's error code for a client that no longer wants the answer.
pub const CANCEL: u32 = 0x8;

/// The most a DATA frame carries (the default SETTINGS_MAX_FRAME_SIZE).
const MAX_FRAME: usize = 16_384;

/// One frame as read.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// A frame's bytes: the 9-byte header, then the payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an `n`-bit prefix, `first` holding the bits above the prefix.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A header block of literal fields without indexing, new names, no Huffman coding.
pub fn literal_block(fields: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int(&mut out, 0x00, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 0x00, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// The `:status` a response's header block starts with, when it says it plainly: an indexed
/// static-table status, or a literal (plain or Huffman-coded digits) with a status name.
/// `None` for what needs the connection's dynamic table.
pub fn status_of(block: &[u8]) -> Option<u16> {
    const STATIC: [(u8, u16); 7] = [
        (8, 200),
        (9, 204),
        (10, 206),
        (11, 304),
        (12, 400),
        (13, 404),
        (14, 500),
    ];
    let first = *block.first()?;
    if first & 0x80 != 0 {
        let index = first & 0x7f;
        return STATIC.iter().find(|(i, _)| *i == index).map(|(_, s)| *s);
    }
    // A literal whose name is a static :status entry (8..=14), with or without indexing.
    let name_index = if first & 0x40 != 0 {
        first & 0x3f
    } else {
        first & 0x0f
    };
    if !(8..=14).contains(&name_index) {
        return None;
    }
    let header = *block.get(1)?;
    let len = (header & 0x7f) as usize;
    let value = block.get(2..2 + len)?;
    let text = if header & 0x80 != 0 {
        huffman_digits(value)?
    } else {
        String::from_utf8(value.to_vec()).ok()?
    };
    text.parse().ok()
}

/// Decodes a Huffman-coded string of decimal digits (a status): '0'-'2' are 5-bit codes
/// 00000-00010, '3'-'9' 6-bit codes 011001-011111 (RFC 7541, appendix B).
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let mut out = String::new();
    let mut at = 0;
    while out.len() < 3 {
        let five = bits.get(at..at + 5)?;
        let value5 = five.iter().fold(0u8, |v, b| v << 1 | b);
        if value5 <= 2 {
            out.push((b'0' + value5) as char);
            at += 5;
            continue;
        }
        let six = bits.get(at..at + 6)?;
        let value6 = six.iter().fold(0u8, |v, b| v << 1 | b);
        if !(0b011001..=0b011111).contains(&value6) {
            return None;
        }
        out.push((b'3' + (value6 - 0b011001)) as char);
        at += 6;
    }
    Some(out)
}

/// A client connection speaking HTTP/2 over cleartext TCP.
pub struct Connection {
    socket: TcpStream,
    buffer: Vec<u8>,
    next_stream: u32,
}

impl Connection {
    /// Connects, sends the preface and SETTINGS (no push, a large window), and widens the
    /// connection's window, so answers never wait on the client.
    pub fn open(port: u16) -> std::io::Result<Self> {
        let socket = super::clients::connect_patiently(port)?;
        socket.set_nodelay(true)?;
        let mut connection = Self {
            socket,
            buffer: Vec::new(),
            next_stream: 1,
        };
        let mut hello = PREFACE.to_vec();
        // SETTINGS_ENABLE_PUSH = 0, SETTINGS_INITIAL_WINDOW_SIZE = 1 MiB.
        let mut settings = Vec::new();
        settings.extend_from_slice(&[0x00, 0x02, 0, 0, 0, 0]);
        settings.extend_from_slice(&[0x00, 0x04]);
        settings.extend_from_slice(&(1u32 << 20).to_be_bytes());
        hello.extend(frame(SETTINGS, 0, 0, &settings));
        hello.extend(frame(WINDOW_UPDATE, 0, 0, &(1u32 << 24).to_be_bytes()));
        connection.socket.write_all(&hello)?;
        Ok(connection)
    }

    /// A new stream's id (odd, increasing).
    pub fn new_stream(&mut self) -> u32 {
        let id = self.next_stream;
        self.next_stream += 2;
        id
    }

    pub fn headers(
        &mut self,
        stream: u32,
        fields: &[(String, String)],
        end_stream: bool,
    ) -> std::io::Result<()> {
        let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
        let bytes = frame(HEADERS, flags, stream, &literal_block(fields));
        self.socket.write_all(&bytes)
    }

    /// `body` in DATA frames, the last one ending the stream if `end_stream`.
    pub fn data(&mut self, stream: u32, body: &[u8], end_stream: bool) -> std::io::Result<()> {
        let chunks: Vec<&[u8]> = if body.is_empty() {
            vec![&[]]
        } else {
            body.chunks(MAX_FRAME).collect()
        };
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let flags = if end_stream && i == last {
                END_STREAM
            } else {
                0
            };
            self.socket.write_all(&frame(DATA, flags, stream, chunk))?;
        }
        Ok(())
    }

    pub fn reset(&mut self, stream: u32) -> std::io::Result<()> {
        self.socket
            .write_all(&frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()))
    }

    /// The next frame within `wait`; `None` if none came. SETTINGS and PING are answered
    /// here (and still returned).
    pub fn read_frame(&mut self, wait: Duration) -> std::io::Result<Option<Frame>> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            if let Some(frame) = self.take_frame() {
                self.answer_control(&frame)?;
                return Ok(Some(frame));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.socket.set_read_timeout(Some(left))?;
            let mut chunk = [0u8; 16_384];
            match self.socket.read(&mut chunk) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn take_frame(&mut self) -> Option<Frame> {
        if self.buffer.len() < 9 {
            return None;
        }
        let len = u32::from_be_bytes([0, self.buffer[0], self.buffer[1], self.buffer[2]]) as usize;
        if self.buffer.len() < 9 + len {
            return None;
        }
        let stream = u32::from_be_bytes([
            self.buffer[5],
            self.buffer[6],
            self.buffer[7],
            self.buffer[8],
        ]) & 0x7fff_ffff;
        let frame = Frame {
            kind: self.buffer[3],
            flags: self.buffer[4],
            stream,
            payload: self.buffer[9..9 + len].to_vec(),
        };
        self.buffer.drain(..9 + len);
        Some(frame)
    }

    fn answer_control(&mut self, f: &Frame) -> std::io::Result<()> {
        match f.kind {
            SETTINGS if f.flags & ACK == 0 => self.socket.write_all(&frame(SETTINGS, ACK, 0, &[])),
            PING if f.flags & ACK == 0 => self.socket.write_all(&frame(PING, ACK, 0, &f.payload)),
            _ => Ok(()),
        }
    }
}

/// A HEADERS payload without its padding and priority fields.
pub fn header_block(f: &Frame) -> &[u8] {
    const PADDED: u8 = 0x8;
    const PRIORITY: u8 = 0x20;
    let mut block: &[u8] = &f.payload;
    let mut pad = 0;
    if f.flags & PADDED != 0 {
        pad = block.first().copied().unwrap_or(0) as usize;
        block = block.get(1..).unwrap_or(&[]);
    }
    if f.flags & PRIORITY != 0 {
        block = block.get(5..).unwrap_or(&[]);
    }
    block.get(..block.len().saturating_sub(pad)).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_past_their_prefix_continue() {
        let mut out = Vec::new();
        hpack_int(&mut out, 0, 5, 1337);
        assert_eq!(out, [31, 154, 10], "RFC 7541, C.1.2");
    }

    #[test]
    fn statuses_are_read_from_the_static_table_and_literals() {
        assert_eq!(status_of(&[0x88]), Some(200));
        assert_eq!(status_of(&[0x8d]), Some(404));
        // :status 429 as a literal with incremental indexing, plain and Huffman-coded
        // ('4' 011010, '2' 00010, '9' 011111, padded with ones).
        assert_eq!(status_of(&[0x48, 0x03, b'4', b'2', b'9']), Some(429));
        assert_eq!(
            status_of(&[0x48, 0x83, 0b0110_1000, 0b0100_1111, 0b1111_1111]),
            Some(429)
        );
        assert_eq!(status_of(&[0xbe]), None, "dynamic table");
    }

    #[test]
    fn a_frame_has_its_length_type_flags_and_stream() {
        assert_eq!(
            frame(RST_STREAM, 0, 3, &CANCEL.to_be_bytes()),
            [0, 0, 4, 3, 0, 0, 0, 0, 3, 0, 0, 0, 8]
        );
    }
}
