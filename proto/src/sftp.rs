//! A sans-IO reader of the SFTP protocol (version 3, what OpenSSH speaks),
//! for recording file operations by path and size without their contents.
//!
//! Feed each direction's bytes as they pass ([`Sftp::from_client`],
//! [`Sftp::from_server`]); each completed operation comes back as an
//! [`Op`] once the server has answered it. Packets larger than
//! [`MAX_PACKET`] are an error: the stream cannot be followed past them.

use std::collections::HashMap;

/// The largest packet followed (OpenSSH's own limit is 256 KiB).
pub const MAX_PACKET: usize = 1 << 20;
/// The most requests followed while they await an answer (OpenSSH's client
/// keeps 64 in flight).
pub const MAX_PENDING: usize = 4096;

const OPEN: u8 = 3;
const CLOSE: u8 = 4;
const READ: u8 = 5;
const WRITE: u8 = 6;
const SETSTAT: u8 = 9;
const FSETSTAT: u8 = 10;
const OPENDIR: u8 = 11;
const REMOVE: u8 = 13;
const MKDIR: u8 = 14;
const RMDIR: u8 = 15;
const RENAME: u8 = 18;
const SYMLINK: u8 = 20;
const STATUS: u8 = 101;
const HANDLE: u8 = 102;
const DATA: u8 = 103;
const EXTENDED: u8 = 200;

/// Why the stream cannot be followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SftpError {
    #[error("an SFTP packet of {0} bytes is larger than {MAX_PACKET}")]
    TooLarge(usize),
    #[error("a malformed SFTP packet (type {0})")]
    Malformed(u8),
    #[error("more than {MAX_PENDING} SFTP requests await an answer")]
    TooManyPending,
}

/// One completed operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// open, close, opendir, remove, mkdir, rmdir, rename, setstat, symlink,
    /// or an extension's name.
    pub op: String,
    pub path: String,
    /// The second path (rename's new name, symlink's target).
    pub target: String,
    /// For open: read, write, append, create, truncate, excl.
    pub flags: Vec<&'static str>,
    /// For close: bytes read and written through the handle.
    pub read: u64,
    pub written: u64,
    /// `ok`, or the server's status message.
    pub status: String,
}

#[derive(Debug)]
enum Pending {
    Open {
        path: String,
        flags: Vec<&'static str>,
        dir: bool,
    },
    Close {
        handle: Vec<u8>,
    },
    Read {
        handle: Vec<u8>,
    },
    Write {
        handle: Vec<u8>,
        len: u64,
    },
    Simple {
        op: String,
        path: String,
        target: String,
    },
}

#[derive(Debug, Default)]
struct File {
    path: String,
    dir: bool,
    read: u64,
    written: u64,
}

/// Both directions of one SFTP session.
#[derive(Debug, Default)]
pub struct Sftp {
    client: Vec<u8>,
    server: Vec<u8>,
    pending: HashMap<u32, Pending>,
    handles: HashMap<Vec<u8>, File>,
}

struct Reader<'a> {
    b: &'a [u8],
    kind: u8,
}

impl<'a> Reader<'a> {
    fn u32(&mut self) -> Result<u32, SftpError> {
        let (h, t) = self
            .b
            .split_first_chunk::<4>()
            .ok_or(SftpError::Malformed(self.kind))?;
        self.b = t;
        Ok(u32::from_be_bytes(*h))
    }

    fn u64(&mut self) -> Result<u64, SftpError> {
        Ok(((self.u32()? as u64) << 32) | self.u32()? as u64)
    }

    fn bytes(&mut self) -> Result<&'a [u8], SftpError> {
        let n = self.u32()? as usize;
        if n > self.b.len() {
            return Err(SftpError::Malformed(self.kind));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }

    fn string(&mut self) -> Result<String, SftpError> {
        Ok(String::from_utf8_lossy(self.bytes()?).into_owned())
    }
}

/// Splits whole packets off `buf`: (type, body after the type byte).
fn packets(buf: &mut Vec<u8>) -> Result<Vec<(u8, Vec<u8>)>, SftpError> {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() - at >= 4 {
        let n = u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        if n > MAX_PACKET {
            return Err(SftpError::TooLarge(n));
        }
        if n == 0 {
            return Err(SftpError::Malformed(0));
        }
        if buf.len() - at - 4 < n {
            break;
        }
        out.push((buf[at + 4], buf[at + 5..at + 4 + n].to_vec()));
        at += 4 + n;
    }
    buf.drain(..at);
    Ok(out)
}

fn open_flags(pflags: u32) -> Vec<&'static str> {
    [
        (0x01, "read"),
        (0x02, "write"),
        (0x04, "append"),
        (0x08, "create"),
        (0x10, "truncate"),
        (0x20, "excl"),
    ]
    .into_iter()
    .filter(|(bit, _)| pflags & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

impl Sftp {
    /// Bytes the client sent.
    pub fn from_client(&mut self, data: &[u8]) -> Result<(), SftpError> {
        self.client.extend_from_slice(data);
        for (kind, body) in packets(&mut self.client)? {
            self.request(kind, &body)?;
        }
        Ok(())
    }

    /// Bytes the server sent; returns the operations they complete.
    pub fn from_server(&mut self, data: &[u8]) -> Result<Vec<Op>, SftpError> {
        self.server.extend_from_slice(data);
        let mut ops = Vec::new();
        for (kind, body) in packets(&mut self.server)? {
            ops.extend(self.response(kind, &body)?);
        }
        Ok(ops)
    }

    /// Files still open when the stream ended, with what passed through
    /// them (`status` says they were not closed).
    pub fn finish(&mut self) -> Vec<Op> {
        let mut open: Vec<Op> = self
            .handles
            .drain()
            .filter(|(_, f)| !f.dir)
            .map(|(_, f)| Op {
                op: "close".into(),
                path: f.path,
                target: String::new(),
                flags: vec![],
                read: f.read,
                written: f.written,
                status: "not closed: the session ended".into(),
            })
            .collect();
        open.sort_by(|a, b| a.path.cmp(&b.path));
        open
    }

    fn request(&mut self, kind: u8, body: &[u8]) -> Result<(), SftpError> {
        if kind == 1 {
            return Ok(()); // INIT carries no id
        }
        let mut r = Reader { b: body, kind };
        let id = r.u32()?;
        let simple = |op: &str, path: String, target: String| Pending::Simple {
            op: op.into(),
            path,
            target,
        };
        let p = match kind {
            OPEN => {
                let path = r.string()?;
                let flags = open_flags(r.u32()?);
                Pending::Open {
                    path,
                    flags,
                    dir: false,
                }
            }
            OPENDIR => Pending::Open {
                path: r.string()?,
                flags: vec![],
                dir: true,
            },
            CLOSE => Pending::Close {
                handle: r.bytes()?.to_vec(),
            },
            READ => Pending::Read {
                handle: r.bytes()?.to_vec(),
            },
            WRITE => {
                let handle = r.bytes()?.to_vec();
                let _offset = r.u64()?;
                let len = r.bytes()?.len() as u64;
                Pending::Write { handle, len }
            }
            REMOVE => simple("remove", r.string()?, String::new()),
            MKDIR => simple("mkdir", r.string()?, String::new()),
            RMDIR => simple("rmdir", r.string()?, String::new()),
            SETSTAT => simple("setstat", r.string()?, String::new()),
            FSETSTAT => {
                let handle = r.bytes()?;
                let path = self
                    .handles
                    .get(handle)
                    .map(|f| f.path.clone())
                    .unwrap_or_default();
                simple("setstat", path, String::new())
            }
            RENAME => {
                let from = r.string()?;
                simple("rename", from, r.string()?)
            }
            // OpenSSH sends (linkpath, targetpath) in the reverse order of
            // the draft; recorded as sent.
            SYMLINK => {
                let a = r.string()?;
                simple("symlink", a, r.string()?)
            }
            EXTENDED => {
                let name = r.string()?;
                match name.as_str() {
                    // Queries that change nothing.
                    "limits@openssh.com"
                    | "statvfs@openssh.com"
                    | "fstatvfs@openssh.com"
                    | "expand-path@openssh.com"
                    | "home-directory"
                    | "users-groups-by-id@openssh.com" => return Ok(()),
                    // Names OpenSSH's extensions take the place of.
                    "posix-rename@openssh.com" => {
                        let from = r.string()?;
                        simple("rename", from, r.string()?)
                    }
                    "hardlink@openssh.com" => {
                        let from = r.string()?;
                        simple("hardlink", from, r.string()?)
                    }
                    "lsetstat@openssh.com" => simple("setstat", r.string()?, String::new()),
                    _ => {
                        let path = r.string().unwrap_or_default();
                        let target = r.string().unwrap_or_default();
                        simple(&name, path, target)
                    }
                }
            }
            // Reads of metadata and directories change nothing.
            _ => return Ok(()),
        };
        if self.pending.len() >= MAX_PENDING && !self.pending.contains_key(&id) {
            return Err(SftpError::TooManyPending);
        }
        self.pending.insert(id, p);
        Ok(())
    }

    fn response(&mut self, kind: u8, body: &[u8]) -> Result<Vec<Op>, SftpError> {
        if kind == 2 {
            return Ok(vec![]); // VERSION
        }
        let mut r = Reader { b: body, kind };
        let id = r.u32()?;
        let Some(p) = self.pending.remove(&id) else {
            return Ok(vec![]);
        };
        let status = match kind {
            STATUS => {
                let code = r.u32()?;
                let msg = r.string().unwrap_or_default();
                if code == 0 {
                    "ok".to_string()
                } else if msg.is_empty() {
                    format!("status {code}")
                } else {
                    msg
                }
            }
            _ => "ok".to_string(),
        };
        let op = |op: &str, path: String, target: String, flags, read, written, status| Op {
            op: op.into(),
            path,
            target,
            flags,
            read,
            written,
            status,
        };
        Ok(match p {
            Pending::Open { path, flags, dir } => {
                if kind == HANDLE {
                    let handle = r.bytes()?.to_vec();
                    self.handles.insert(
                        handle,
                        File {
                            path: path.clone(),
                            dir,
                            ..Default::default()
                        },
                    );
                }
                let name = if dir { "opendir" } else { "open" };
                vec![op(name, path, String::new(), flags, 0, 0, status)]
            }
            Pending::Read { handle } => {
                if kind == DATA {
                    let n = r.bytes()?.len() as u64;
                    if let Some(f) = self.handles.get_mut(&handle) {
                        f.read += n;
                    }
                }
                vec![]
            }
            Pending::Write { handle, len } => {
                if status == "ok" {
                    if let Some(f) = self.handles.get_mut(&handle) {
                        f.written += len;
                    }
                }
                vec![]
            }
            Pending::Close { handle } => match self.handles.remove(&handle) {
                // Directory handles only list names: not recorded again.
                Some(f) if f.dir => vec![],
                Some(f) => vec![op(
                    "close",
                    f.path,
                    String::new(),
                    vec![],
                    f.read,
                    f.written,
                    status,
                )],
                None => vec![],
            },
            Pending::Simple {
                op: name,
                path,
                target,
            } => {
                vec![op(&name, path, target, vec![], 0, 0, status)]
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(kind: u8, fields: &[&[u8]]) -> Vec<u8> {
        let mut body = vec![kind];
        for f in fields {
            body.extend_from_slice(f);
        }
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend(body);
        out
    }
    fn u32b(v: u32) -> Vec<u8> {
        v.to_be_bytes().to_vec()
    }
    fn s(v: &[u8]) -> Vec<u8> {
        let mut out = u32b(v.len() as u32);
        out.extend_from_slice(v);
        out
    }

    #[test]
    fn an_upload_and_a_rename_are_recorded_by_path_and_size() {
        let mut sftp = Sftp::default();
        let mut client = packet(1, &[&u32b(3)]);
        client.extend(packet(
            OPEN,
            &[&u32b(1), &s(b"/tmp/up"), &u32b(0x1a), &u32b(0)],
        ));
        // Split anywhere: the reader waits for whole packets.
        let (a, b) = client.split_at(7);
        sftp.from_client(a).unwrap();
        sftp.from_client(b).unwrap();
        assert!(sftp
            .from_server(&packet(2, &[&u32b(3)]))
            .unwrap()
            .is_empty());
        let ops = sftp
            .from_server(&packet(HANDLE, &[&u32b(1), &s(b"h1")]))
            .unwrap();
        assert_eq!(ops[0].op, "open");
        assert_eq!(ops[0].path, "/tmp/up");
        assert_eq!(ops[0].flags, vec!["write", "create", "truncate"]);
        for (id, len) in [(2u32, 1000usize), (3, 24)] {
            sftp.from_client(&packet(
                WRITE,
                &[&u32b(id), &s(b"h1"), &[0u8; 8], &s(&vec![b'x'; len])],
            ))
            .unwrap();
            sftp.from_server(&packet(STATUS, &[&u32b(id), &u32b(0), &s(b""), &s(b"")]))
                .unwrap();
        }
        sftp.from_client(&packet(CLOSE, &[&u32b(4), &s(b"h1")]))
            .unwrap();
        let ops = sftp
            .from_server(&packet(
                STATUS,
                &[&u32b(4), &u32b(0), &s(b"Success"), &s(b"")],
            ))
            .unwrap();
        assert_eq!(
            (
                ops[0].op.as_str(),
                ops[0].path.as_str(),
                ops[0].written,
                ops[0].read
            ),
            ("close", "/tmp/up", 1024, 0)
        );
        sftp.from_client(&packet(
            RENAME,
            &[&u32b(5), &s(b"/tmp/up"), &s(b"/tmp/done")],
        ))
        .unwrap();
        let ops = sftp
            .from_server(&packet(
                STATUS,
                &[&u32b(5), &u32b(4), &s(b"Failure"), &s(b"")],
            ))
            .unwrap();
        assert_eq!(
            (
                ops[0].op.as_str(),
                ops[0].path.as_str(),
                ops[0].target.as_str(),
                ops[0].status.as_str()
            ),
            ("rename", "/tmp/up", "/tmp/done", "Failure")
        );
        // OpenSSH's extensions read as the operations they stand for;
        // queries are not operations.
        sftp.from_client(&packet(
            EXTENDED,
            &[
                &u32b(6),
                &s(b"posix-rename@openssh.com"),
                &s(b"/a"),
                &s(b"/b"),
            ],
        ))
        .unwrap();
        sftp.from_client(&packet(EXTENDED, &[&u32b(7), &s(b"limits@openssh.com")]))
            .unwrap();
        let ops = sftp
            .from_server(
                &[
                    packet(STATUS, &[&u32b(6), &u32b(0), &s(b""), &s(b"")]),
                    packet(201, &[&u32b(7), &[0u8; 32]]),
                ]
                .concat(),
            )
            .unwrap();
        assert_eq!(ops.len(), 1, "{ops:?}");
        assert_eq!(
            (
                ops[0].op.as_str(),
                ops[0].path.as_str(),
                ops[0].target.as_str()
            ),
            ("rename", "/a", "/b")
        );
    }

    #[test]
    fn a_download_counts_the_data_returned() {
        let mut sftp = Sftp::default();
        sftp.from_client(&packet(OPEN, &[&u32b(1), &s(b"f"), &u32b(1), &u32b(0)]))
            .unwrap();
        sftp.from_server(&packet(HANDLE, &[&u32b(1), &s(b"h")]))
            .unwrap();
        sftp.from_client(&packet(READ, &[&u32b(2), &s(b"h"), &[0u8; 8], &u32b(4096)]))
            .unwrap();
        sftp.from_server(&packet(DATA, &[&u32b(2), &s(&[7u8; 300])]))
            .unwrap();
        sftp.from_client(&packet(CLOSE, &[&u32b(3), &s(b"h")]))
            .unwrap();
        let ops = sftp
            .from_server(&packet(STATUS, &[&u32b(3), &u32b(0), &s(b""), &s(b"")]))
            .unwrap();
        assert_eq!((ops[0].read, ops[0].written), (300, 0));
    }

    #[test]
    fn oversized_and_malformed_packets_are_errors() {
        let mut sftp = Sftp::default();
        let e = sftp.from_client(&u32b(MAX_PACKET as u32 + 1)).unwrap_err();
        assert_eq!(e, SftpError::TooLarge(MAX_PACKET + 1));
        let mut sftp = Sftp::default();
        let e = sftp
            .from_client(&packet(OPEN, &[&u32b(1), &u32b(99)]))
            .unwrap_err();
        assert_eq!(e, SftpError::Malformed(OPEN));
    }
}
