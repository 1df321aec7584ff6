//! A sans-IO reader of scp's legacy protocol (what `scp -O` runs on the
//! target: `scp -t` to receive, `scp -f` to send), for recording the files
//! it moves by path and size without their contents.
//!
//! [`command`] tells whether an exec command is that protocol's remote end,
//! and which way the files go. The sender's stream (the client's for an
//! upload, the target's for a download) is fed to [`Scp::feed`] as it
//! passes; each file comes back once its bytes have passed.

/// The longest control line followed (OpenSSH's own buffer is 2 KiB).
pub const MAX_LINE: usize = 8192;

/// Which way the files go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `scp -t`: the client sends.
    Upload,
    /// `scp -f`: the target sends.
    Download,
}

/// Why the stream cannot be followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScpError {
    #[error("an scp control line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("a malformed scp control line: {0:?}")]
    Malformed(String),
}

/// One file or directory moved, or an error the sender reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// upload, download, mkdir, or error.
    pub op: &'static str,
    /// The path on the target.
    pub path: String,
    /// The name the sender gave.
    pub name: String,
    /// The file's mode, as sent (`0644`).
    pub mode: String,
    pub size: u64,
    /// ok, incomplete (the stream ended inside the file), or the sender's
    /// message.
    pub status: String,
}

/// Reads an exec command: `Some` when it is scp's remote end (`scp … -t|-f
/// [--] PATH`), with the direction and the path as given.
pub fn command(cmd: &str) -> Option<(Direction, String, bool)> {
    let mut words = cmd.split_whitespace();
    let prog = words.next()?;
    if prog != "scp" && !prog.ends_with("/scp") {
        return None;
    }
    let mut dir = None;
    let mut to_dir = false;
    let mut path = Vec::new();
    let mut options = true;
    for w in words {
        if options && w == "--" {
            options = false;
        } else if options && w.starts_with('-') && w.len() > 1 {
            for c in w[1..].chars() {
                match c {
                    't' => dir = Some(Direction::Upload),
                    'f' => dir = Some(Direction::Download),
                    'd' => to_dir = true,
                    _ => {}
                }
            }
        } else {
            options = false;
            path.push(w);
        }
    }
    Some((dir?, path.join(" "), to_dir))
}

#[derive(Debug)]
enum State {
    Line,
    Data {
        op: Op,
        left: u64,
    },
    /// The byte the sender writes after a file's data.
    End(Op),
}

/// One direction of one scp run.
#[derive(Debug)]
pub struct Scp {
    direction: Direction,
    base: String,
    to_dir: bool,
    /// Directories entered (full paths).
    dirs: Vec<String>,
    line: Vec<u8>,
    state: State,
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

impl Scp {
    /// `base` and `to_dir` as [`command`] read them.
    pub fn new(direction: Direction, base: &str, to_dir: bool) -> Self {
        Self {
            direction,
            base: base.to_owned(),
            to_dir,
            dirs: Vec::new(),
            line: Vec::new(),
            state: State::Line,
        }
    }

    /// Where an entry named `name` lands (upload) or comes from (download).
    fn path_of(&self, name: &str) -> String {
        if let Some(d) = self.dirs.last() {
            return join(d, name);
        }
        match self.direction {
            Direction::Upload if self.to_dir || self.base.ends_with('/') => join(&self.base, name),
            Direction::Upload => self.base.clone(),
            Direction::Download => {
                let last = self.base.trim_end_matches('/').rsplit('/').next();
                if last == Some(name) {
                    self.base.clone()
                } else {
                    match self.base.rsplit_once('/') {
                        Some((parent, _)) => join(parent, name),
                        None => name.to_owned(),
                    }
                }
            }
        }
    }

    /// The sender's bytes; returns the files they complete.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<Vec<Op>, ScpError> {
        let mut ops = Vec::new();
        while !data.is_empty() {
            match &mut self.state {
                State::Data { left, .. } => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        let State::Data { op, .. } =
                            std::mem::replace(&mut self.state, State::Line)
                        else {
                            unreachable!()
                        };
                        self.state = State::End(op);
                    }
                }
                State::End(_) => {
                    let State::End(mut op) = std::mem::replace(&mut self.state, State::Line) else {
                        unreachable!()
                    };
                    if data[0] != 0 {
                        op.status = "the sender reported an error after the data".into();
                    }
                    data = &data[1..];
                    ops.push(op);
                }
                State::Line => {
                    // A lone NUL between lines is an acknowledgement.
                    if self.line.is_empty() && data[0] == 0 {
                        data = &data[1..];
                        continue;
                    }
                    let end = data.iter().position(|&b| b == b'\n');
                    let take = end.map_or(data.len(), |i| i + 1);
                    if self.line.len() + take > MAX_LINE {
                        return Err(ScpError::LineTooLong);
                    }
                    self.line.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if end.is_some() {
                        let line = std::mem::take(&mut self.line);
                        if let Some(op) = self.control(&line[..line.len() - 1])? {
                            ops.push(op);
                        }
                    }
                }
            }
        }
        Ok(ops)
    }

    /// Files cut off by the end of the stream.
    pub fn finish(&mut self) -> Vec<Op> {
        match std::mem::replace(&mut self.state, State::Line) {
            State::Data { mut op, left } => {
                op.size -= left;
                op.status = "incomplete".into();
                vec![op]
            }
            State::End(op) => vec![op],
            State::Line => vec![],
        }
    }

    fn control(&mut self, line: &[u8]) -> Result<Option<Op>, ScpError> {
        let text = String::from_utf8_lossy(line).into_owned();
        let bad = || ScpError::Malformed(text.chars().take(200).collect());
        let Some((&kind, rest)) = line.split_first() else {
            return Err(bad());
        };
        let rest = String::from_utf8_lossy(rest).into_owned();
        match kind {
            b'T' => Ok(None),
            b'E' => {
                self.dirs.pop();
                Ok(None)
            }
            1 | 2 => Ok(Some(Op {
                op: "error",
                path: String::new(),
                name: String::new(),
                mode: String::new(),
                size: 0,
                status: rest,
            })),
            b'C' | b'D' => {
                let mut parts = rest.splitn(3, ' ');
                let (Some(mode), Some(size), Some(name)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return Err(bad());
                };
                let size: u64 = size.parse().map_err(|_| bad())?;
                if name.is_empty() || name.contains('/') || name == ".." {
                    return Err(bad());
                }
                let path = self.path_of(name);
                let op = Op {
                    op: if kind == b'D' {
                        "mkdir"
                    } else {
                        match self.direction {
                            Direction::Upload => "upload",
                            Direction::Download => "download",
                        }
                    },
                    path: path.clone(),
                    name: name.to_owned(),
                    mode: mode.to_owned(),
                    size,
                    status: "ok".into(),
                };
                if kind == b'D' {
                    self.dirs.push(path);
                    return Ok(Some(op));
                }
                self.state = if size == 0 {
                    State::End(op)
                } else {
                    State::Data { op, left: size }
                };
                Ok(None)
            }
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_read_with_their_direction() {
        assert_eq!(
            command("scp -t -- /tmp/up.bin"),
            Some((Direction::Upload, "/tmp/up.bin".into(), false))
        );
        assert_eq!(
            command("/usr/bin/scp -v -r -d -t -- /srv/dir"),
            Some((Direction::Upload, "/srv/dir".into(), true))
        );
        assert_eq!(
            command("scp -pf /etc/hosts"),
            Some((Direction::Download, "/etc/hosts".into(), false))
        );
        assert_eq!(command("scp /a /b"), None);
        assert_eq!(command("echo scp -t x"), None);
    }

    #[test]
    fn an_upload_split_anywhere_gives_each_file_once() {
        let mut stream = b"T1700000000 0 1700000000 0\nC0644 5 a.txt\nhello\0".to_vec();
        stream.extend_from_slice(b"D0755 0 sub\nC0600 3 b.bin\nxyz\0E\n");
        stream.extend_from_slice(b"C0644 0 empty\n\0");
        for split in 1..stream.len() {
            let mut s = Scp::new(Direction::Upload, "/srv/in", true);
            let mut ops = s.feed(&stream[..split]).unwrap();
            ops.extend(s.feed(&stream[split..]).unwrap());
            let got: Vec<(&str, String, u64)> =
                ops.iter().map(|o| (o.op, o.path.clone(), o.size)).collect();
            assert_eq!(
                got,
                vec![
                    ("upload", "/srv/in/a.txt".into(), 5),
                    ("mkdir", "/srv/in/sub".into(), 0),
                    ("upload", "/srv/in/sub/b.bin".into(), 3),
                    ("upload", "/srv/in/empty".into(), 0),
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn download_paths_follow_the_source_and_cut_files_are_incomplete() {
        let mut s = Scp::new(Direction::Download, "/etc/hosts", false);
        let ops = s.feed(b"C0644 10 hosts\n0123").unwrap();
        assert!(ops.is_empty());
        let cut = s.finish();
        assert_eq!(cut[0].path, "/etc/hosts");
        assert_eq!(cut[0].size, 4);
        assert_eq!(cut[0].status, "incomplete");

        let mut s = Scp::new(Direction::Upload, "/tmp/x.bin", false);
        let ops = s.feed(b"C0644 1 local-name\nz\0").unwrap();
        assert_eq!(ops[0].path, "/tmp/x.bin");
        assert_eq!(ops[0].name, "local-name");
    }

    #[test]
    fn errors_and_bad_lines() {
        let mut s = Scp::new(Direction::Download, "/nope", false);
        let ops = s
            .feed(b"\x01scp: /nope: No such file or directory\n")
            .unwrap();
        assert_eq!(ops[0].op, "error");
        assert!(ops[0].status.contains("No such file"));
        let mut s = Scp::new(Direction::Upload, "/x", false);
        assert!(s.feed(b"C0644 notanumber f\n").is_err());
        let mut s = Scp::new(Direction::Upload, "/x", false);
        assert!(s.feed(b"C0644 1 ../escape\n").is_err());
        let mut s = Scp::new(Direction::Upload, "/x", false);
        assert_eq!(s.feed(&[b'C'; MAX_LINE + 1]), Err(ScpError::LineTooLong));
    }
}
