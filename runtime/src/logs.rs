//! The container log: the supervisor appends one record per read from the container's stdout or
//! stderr; `logs` replays them to the matching stream. A record is
//! `[stream: u8 (1 stdout, 2 stderr)][len: u32 LE][len bytes]`.

use std::io::{self, Read, Write};

pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;

pub fn encode(stream: u8, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + data.len());
    v.push(stream);
    v.extend_from_slice(&(data.len() as u32).to_le_bytes());
    v.extend_from_slice(data);
    v
}

/// Splits complete records off the front of `buf`; returns (records, bytes consumed).
pub fn decode(buf: &[u8]) -> (Vec<(u8, &[u8])>, usize) {
    let mut out = Vec::new();
    let mut i = 0;
    while buf.len() - i >= 5 {
        let len = u32::from_le_bytes([buf[i + 1], buf[i + 2], buf[i + 3], buf[i + 4]]) as usize;
        if buf.len() - i - 5 < len {
            break;
        }
        out.push((buf[i], &buf[i + 5..i + 5 + len]));
        i += 5 + len;
    }
    (out, i)
}

/// Incremental reader over a growing log file.
pub struct LogReader<R> {
    r: R,
    pending: Vec<u8>,
}

impl<R: Read> LogReader<R> {
    pub fn new(r: R) -> Self {
        LogReader {
            r,
            pending: Vec::new(),
        }
    }

    /// Copies every complete record now available; returns whether anything was copied.
    pub fn pump(&mut self, out: &mut dyn Write, err: &mut dyn Write) -> io::Result<bool> {
        let mut chunk = [0u8; 65536];
        let mut any = false;
        loop {
            let n = self.r.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            self.pending.extend_from_slice(&chunk[..n]);
            let (recs, used) = decode(&self.pending);
            for (s, d) in recs {
                if s == STDERR {
                    err.write_all(d)?;
                } else {
                    out.write_all(d)?;
                }
                any = true;
            }
            self.pending.drain(..used);
        }
        out.flush()?;
        err.flush()?;
        Ok(any)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_partial_records() {
        let mut buf = encode(STDOUT, b"hello ");
        buf.extend(encode(STDERR, b"oops"));
        buf.extend(encode(STDOUT, b"world"));
        let cut = buf.len() - 2;
        let (recs, used) = decode(&buf[..cut]);
        assert_eq!(recs, vec![(STDOUT, &b"hello "[..]), (STDERR, &b"oops"[..])]);
        let (rest, _) = decode(&buf[used..]);
        assert_eq!(rest, vec![(STDOUT, &b"world"[..])]);

        let mut lr = LogReader::new(&buf[..]);
        let (mut o, mut e) = (Vec::new(), Vec::new());
        assert!(lr.pump(&mut o, &mut e).unwrap());
        assert_eq!(o, b"hello world");
        assert_eq!(e, b"oops");
    }
}
