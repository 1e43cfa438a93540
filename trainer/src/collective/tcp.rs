//! The CPU collective backend: pure Rust over `std::net::TcpStream`, a star through rank 0.
//!
//! Rendezvous: rank 0 binds a listener ([`TcpRendezvous::bind`]), publishes the address it got,
//! and [`TcpRendezvous::accept`]s one connection from every other rank. The others
//! [`TcpCollective::connect`] (retrying until the setup timeout, since rank 0 may bind later).
//! The handshake carries rank, world and a token (the job/attempt fingerprint); rank 0 refuses a
//! peer whose token or world differs, whose rank is out of range or already taken, and keeps
//! waiting for the right one.
//!
//! An operation: every other rank sends a header (operation, dtype, root, sequence number,
//! length) and its data to rank 0; rank 0 checks that the headers agree with its own, reduces in
//! rank order (f32 sums in f64), and sends the result back. So every rank ends with bit-identical
//! values, and the result does not depend on arrival order. Any failure poisons the
//! communicator: rank 0 tells the others (best effort) and closes every connection, so nobody
//! waits for the timeout on a peer that already knows the attempt is over.
//!
//! Wire format: little-endian headers; the data is the tensor's bytes as they are in memory (the
//! handshake refuses peers of the other endianness).

use super::{check_kind, check_root, Collective, CollectiveError, Timeouts, SUM_KINDS};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const MAGIC: &[u8; 8] = b"SEGTCOL1";
const BIG_ENDIAN: u8 = cfg!(target_endian = "big") as u8;
/// The longest a half-open connection may stall rank 0's handshake loop.
const HANDSHAKE_READ_CAP: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Mean = 1,
    Sum = 2,
    Broadcast = 3,
    Barrier = 4,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Mean => "all_reduce_mean",
            Op::Sum => "all_reduce_sum",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
        }
    }
}

/// Our own wire code of a dtype (tch keeps libtorch's private).
fn kind_code(kind: Kind) -> u8 {
    match kind {
        Kind::Uint8 => 1,
        Kind::Int8 => 2,
        Kind::Int16 => 3,
        Kind::Int => 4,
        Kind::Int64 => 5,
        Kind::Half => 6,
        Kind::Float => 7,
        Kind::Double => 8,
        Kind::Bool => 9,
        Kind::BFloat16 => 10,
        _ => 0,
    }
}

/// One operation's header; every rank must send the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    op: u8,
    kind: u8,
    root: u32,
    seq: u64,
    numel: u64,
}

impl Header {
    const LEN: usize = 1 + 1 + 4 + 8 + 8;

    fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = self.op;
        b[1] = self.kind;
        b[2..6].copy_from_slice(&self.root.to_le_bytes());
        b[6..14].copy_from_slice(&self.seq.to_le_bytes());
        b[14..22].copy_from_slice(&self.numel.to_le_bytes());
        b
    }

    fn decode(b: &[u8; Self::LEN]) -> Header {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Header {
            op: b[0],
            kind: b[1],
            root: u32_at(2),
            seq: u64_at(6),
            numel: u64_at(14),
        }
    }
}

/// Rank 0's listener between binding and the arrival of every peer.
#[derive(Debug)]
pub struct TcpRendezvous {
    listener: TcpListener,
    addr: String,
}

impl TcpRendezvous {
    /// Binds `addr` (`host:port`; port 0 picks a free one). Returns the listener and the
    /// `host:port` actually bound, which the other ranks connect to.
    pub fn bind(addr: &str) -> Result<(TcpRendezvous, String), CollectiveError> {
        let listener = TcpListener::bind(addr).map_err(|e| CollectiveError::Rendezvous {
            message: format!("cannot listen on {addr}: {e}"),
        })?;
        let bound = listener
            .local_addr()
            .map_err(|e| CollectiveError::Rendezvous {
                message: format!("listening on {addr}: {e}"),
            })?
            .to_string();
        Ok((
            TcpRendezvous {
                listener,
                addr: bound.clone(),
            },
            bound,
        ))
    }

    /// The `host:port` bound.
    pub fn address(&self) -> &str {
        &self.addr
    }

    /// Waits (up to `timeouts.setup`) until ranks 1..world have connected with this `world` and
    /// `token`. Peers that do not match are refused and do not count.
    pub fn accept(
        self,
        world: usize,
        token: u64,
        timeouts: Timeouts,
    ) -> Result<TcpCollective, CollectiveError> {
        if world < 2 {
            return Err(CollectiveError::Rendezvous {
                message: format!("a TCP rendezvous needs a world of 2 or more, got {world}"),
            });
        }
        let deadline = Instant::now() + timeouts.setup;
        self.listener
            .set_nonblocking(true)
            .map_err(|e| CollectiveError::Rendezvous {
                message: format!("{}: {e}", self.addr),
            })?;
        let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        let mut refused: Vec<String> = Vec::new();
        while peers[1..].iter().any(Option::is_none) {
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = (1..world).filter(|&r| peers[r].is_none()).collect();
                let why = if refused.is_empty() {
                    String::new()
                } else {
                    format!("; refused: {}", refused.join("; "))
                };
                return Err(CollectiveError::Rendezvous {
                    message: format!(
                        "rank 0 at {} waited {:?} for ranks {missing:?} of {world} to connect{why}",
                        self.addr, timeouts.setup
                    ),
                });
            }
            let (stream, from) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(CollectiveError::Rendezvous {
                        message: format!("accepting on {}: {e}", self.addr),
                    })
                }
            };
            let read_for = deadline
                .saturating_duration_since(Instant::now())
                .min(HANDSHAKE_READ_CAP)
                .max(Duration::from_millis(1));
            match admit(stream, from, &peers, world, token, read_for, timeouts.step) {
                Ok((rank, stream)) => peers[rank] = Some(stream),
                Err(why) => refused.push(why),
            }
        }
        let peers = peers.into_iter().skip(1).flatten().collect();
        Ok(TcpCollective {
            rank: 0,
            world,
            timeouts,
            links: Links::Root(peers),
            seq: 0,
            poisoned: None,
        })
    }
}

/// Reads one handshake; answers it; returns the peer's rank, or why it was refused.
fn admit(
    mut stream: TcpStream,
    from: SocketAddr,
    peers: &[Option<TcpStream>],
    world: usize,
    token: u64,
    read_for: Duration,
    step: Duration,
) -> Result<(usize, TcpStream), String> {
    let setup = |s: &TcpStream| -> std::io::Result<()> {
        s.set_nonblocking(false)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(read_for))?;
        s.set_write_timeout(Some(read_for))
    };
    setup(&stream).map_err(|e| format!("{from}: {e}"))?;
    let mut b = [0u8; 8 + 1 + 4 + 4 + 8];
    stream
        .read_exact(&mut b)
        .map_err(|e| format!("{from}: no handshake ({e})"))?;
    if &b[..8] != MAGIC {
        return Err(format!("{from}: not a segtrain collective peer"));
    }
    let their_endian = b[8];
    let rank = u32::from_le_bytes(b[9..13].try_into().expect("4 bytes")) as usize;
    let their_world = u32::from_le_bytes(b[13..17].try_into().expect("4 bytes")) as usize;
    let their_token = u64::from_le_bytes(b[17..25].try_into().expect("8 bytes"));
    let refusal = if their_token != token {
        Some(format!(
            "token mismatch: rank 0 runs attempt token {token}, the peer has {their_token} \
             (a peer of another job or attempt?)"
        ))
    } else if their_world != world {
        Some(format!(
            "world mismatch: rank 0 has world {world}, the peer {their_world}"
        ))
    } else if rank == 0 || rank >= world {
        Some(format!("rank {rank} is not one of 1..{world}"))
    } else if peers[rank].is_some() {
        Some(format!("rank {rank} has already joined"))
    } else if their_endian != BIG_ENDIAN {
        Some("the peer's byte order differs from rank 0's".to_string())
    } else {
        None
    };
    match refusal {
        Some(msg) => {
            let mut reply = vec![1u8];
            reply.extend_from_slice(&(msg.len() as u32).to_le_bytes());
            reply.extend_from_slice(msg.as_bytes());
            let _ = stream.write_all(&reply);
            let _ = stream.shutdown(Shutdown::Both);
            Err(format!("{from} (rank {rank}): {msg}"))
        }
        None => {
            stream
                .write_all(&[0u8])
                .map_err(|e| format!("{from} (rank {rank}): {e}"))?;
            stream
                .set_read_timeout(Some(step))
                .and_then(|_| stream.set_write_timeout(Some(step)))
                .map_err(|e| format!("{from} (rank {rank}): {e}"))?;
            Ok((rank, stream))
        }
    }
}

#[derive(Debug)]
enum Links {
    /// Rank 0: the streams of ranks 1..world, in rank order.
    Root(Vec<TcpStream>),
    /// Other ranks: the stream to rank 0.
    Leaf(TcpStream),
}

/// One rank's end of the star.
#[derive(Debug)]
pub struct TcpCollective {
    rank: usize,
    world: usize,
    timeouts: Timeouts,
    links: Links,
    seq: u64,
    /// Why an earlier operation failed: every later one fails at once.
    poisoned: Option<String>,
}

impl TcpCollective {
    /// Rank `rank` (1..world) connects to rank 0 at `addr`, retrying until `timeouts.setup`
    /// (rank 0 may bind later), and performs the handshake.
    pub fn connect(
        addr: &str,
        rank: usize,
        world: usize,
        token: u64,
        timeouts: Timeouts,
    ) -> Result<TcpCollective, CollectiveError> {
        if rank == 0 || rank >= world {
            return Err(CollectiveError::Rendezvous {
                message: format!("rank {rank} cannot connect: it must be one of 1..{world}"),
            });
        }
        let deadline = Instant::now() + timeouts.setup;
        let targets: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| CollectiveError::Rendezvous {
                message: format!("rank {rank}: cannot resolve rank 0's address {addr:?}: {e}"),
            })?
            .collect();
        let mut last_err = String::from("no address");
        let mut stream = None;
        'outer: while Instant::now() < deadline {
            for t in &targets {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break 'outer;
                }
                match TcpStream::connect_timeout(t, left.min(Duration::from_secs(5))) {
                    Ok(s) => {
                        stream = Some(s);
                        break 'outer;
                    }
                    Err(e) => last_err = e.to_string(),
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut stream = stream.ok_or_else(|| CollectiveError::Rendezvous {
            message: format!(
                "rank {rank}: could not reach rank 0 at {addr} within {:?}: {last_err}",
                timeouts.setup
            ),
        })?;
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        let io = |e: std::io::Error| CollectiveError::io("rendezvous", 0, timeouts.setup, e);
        stream.set_nodelay(true).map_err(io)?;
        stream.set_read_timeout(Some(left)).map_err(io)?;
        stream.set_write_timeout(Some(left)).map_err(io)?;
        let mut hello = Vec::with_capacity(25);
        hello.extend_from_slice(MAGIC);
        hello.push(BIG_ENDIAN);
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(world as u32).to_le_bytes());
        hello.extend_from_slice(&token.to_le_bytes());
        stream.write_all(&hello).map_err(io)?;
        let mut status = [0u8; 1];
        stream.read_exact(&mut status).map_err(io)?;
        if status[0] != 0 {
            let msg = read_message(&mut stream).unwrap_or_else(|_| "no reason given".to_string());
            return Err(CollectiveError::Rendezvous {
                message: format!("rank 0 at {addr} refused rank {rank}: {msg}"),
            });
        }
        stream.set_read_timeout(Some(timeouts.step)).map_err(io)?;
        stream.set_write_timeout(Some(timeouts.step)).map_err(io)?;
        Ok(TcpCollective {
            rank,
            world,
            timeouts,
            links: Links::Leaf(stream),
            seq: 0,
            poisoned: None,
        })
    }

    /// Runs one operation: checks, moves a CUDA tensor through the host, poisons on failure.
    fn run(&mut self, op: Op, t: Option<&mut Tensor>, root: usize) -> Result<(), CollectiveError> {
        if let Some(reason) = &self.poisoned {
            return Err(CollectiveError::Poisoned {
                op: op.name(),
                reason: reason.clone(),
            });
        }
        self.seq += 1;
        let result = match t {
            None => self.exchange(op, None, root),
            Some(t) if t.device() == Device::Cpu => self.exchange(op, Some(t), root),
            Some(t) => {
                let mut host = t.to_device(Device::Cpu).contiguous();
                let r = self.exchange(op, Some(&mut host), root);
                if r.is_ok() {
                    tch::no_grad(|| t.copy_(&host));
                }
                r
            }
        };
        if let Err(e) = &result {
            self.poison(e.to_string());
        }
        result
    }

    /// Marks the communicator failed and closes every connection (rank 0 first tells the
    /// others why).
    fn poison(&mut self, reason: String) {
        match &mut self.links {
            Links::Root(peers) => {
                let mut msg = vec![1u8];
                let text = format!("rank 0 gave up: {reason}");
                msg.extend_from_slice(&(text.len() as u32).to_le_bytes());
                msg.extend_from_slice(text.as_bytes());
                for p in peers.iter_mut() {
                    let _ = p.set_write_timeout(Some(Duration::from_millis(200)));
                    let _ = p.write_all(&msg);
                    let _ = p.shutdown(Shutdown::Both);
                }
            }
            Links::Leaf(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        self.poisoned = Some(reason);
    }

    fn exchange(
        &mut self,
        op: Op,
        t: Option<&mut Tensor>,
        root: usize,
    ) -> Result<(), CollectiveError> {
        let (kind, numel) = t
            .as_ref()
            .map_or((Kind::Uint8, 0), |t| (t.kind(), t.numel()));
        let header = Header {
            op: op as u8,
            kind: kind_code(kind),
            root: root as u32,
            seq: self.seq,
            numel: numel as u64,
        };
        let elt = kind.elt_size_in_bytes();
        // SAFETY: `t` is a contiguous CPU tensor that we hold mutably for this whole call; the
        // slice covers exactly its elements.
        let data: &mut [u8] = match t {
            Some(t) if numel > 0 => unsafe {
                std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, numel * elt)
            },
            _ => &mut [],
        };
        let (rank, world, step) = (self.rank, self.world, self.timeouts.step);
        let name = op.name();
        match &mut self.links {
            Links::Leaf(s) => {
                let io = |e| CollectiveError::io(name, 0, step, e);
                let sends =
                    matches!(op, Op::Mean | Op::Sum) || (op == Op::Broadcast && root == rank);
                let receives =
                    matches!(op, Op::Mean | Op::Sum) || (op == Op::Broadcast && root != rank);
                s.write_all(&header.encode()).map_err(io)?;
                if sends {
                    s.write_all(data).map_err(io)?;
                }
                let mut status = [0u8; 1];
                s.read_exact(&mut status).map_err(io)?;
                if status[0] != 0 {
                    let message = read_message(s).unwrap_or_else(|e| format!("(no reason: {e})"));
                    return Err(CollectiveError::Protocol {
                        op: name,
                        peer: 0,
                        message,
                    });
                }
                if receives {
                    s.read_exact(data).map_err(io)?;
                }
                Ok(())
            }
            Links::Root(peers) => {
                let mut reduce = Reducer::new(op, kind, world, data);
                let mut bcast: Option<Vec<u8>> = None;
                for (i, p) in peers.iter_mut().enumerate() {
                    let peer = i + 1;
                    let io = |e| CollectiveError::io(name, peer, step, e);
                    let mut hb = [0u8; Header::LEN];
                    p.read_exact(&mut hb).map_err(io)?;
                    let theirs = Header::decode(&hb);
                    if theirs != header {
                        return Err(CollectiveError::Protocol {
                            op: name,
                            peer,
                            message: format!(
                                "the ranks disagree on the operation: rank 0 runs {header:?}, \
                                 rank {peer} {theirs:?}"
                            ),
                        });
                    }
                    match op {
                        Op::Mean | Op::Sum => {
                            let mut buf = vec![0u8; numel * elt];
                            p.read_exact(&mut buf).map_err(io)?;
                            reduce.add(&buf);
                        }
                        Op::Broadcast if root == peer => {
                            let mut buf = vec![0u8; numel * elt];
                            p.read_exact(&mut buf).map_err(io)?;
                            bcast = Some(buf);
                        }
                        _ => {}
                    }
                }
                let data = reduce.finish();
                if let Some(b) = &bcast {
                    data.copy_from_slice(b);
                }
                for (i, p) in peers.iter_mut().enumerate() {
                    let peer = i + 1;
                    let io = |e| CollectiveError::io(name, peer, step, e);
                    p.write_all(&[0u8]).map_err(io)?;
                    let receives =
                        matches!(op, Op::Mean | Op::Sum) || (op == Op::Broadcast && root != peer);
                    if receives {
                        p.write_all(data).map_err(io)?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// Rank 0's reduction: accumulates the others' contributions, in rank order, into an f64
/// (floats) or i64 accumulator seeded with rank 0's own values; writes the result back.
struct Reducer<'a> {
    op: Op,
    kind: Kind,
    world: usize,
    data: &'a mut [u8],
    f: Vec<f64>,
    i: Vec<i64>,
}

impl<'a> Reducer<'a> {
    fn new(op: Op, kind: Kind, world: usize, data: &'a mut [u8]) -> Reducer<'a> {
        let (mut f, mut i) = (Vec::new(), Vec::new());
        if matches!(op, Op::Mean | Op::Sum) {
            match kind {
                Kind::Float => f = data.chunks_exact(4).map(|c| f32_of(c) as f64).collect(),
                Kind::Double => f = data.chunks_exact(8).map(f64_of).collect(),
                Kind::Int64 => i = data.chunks_exact(8).map(i64_of).collect(),
                _ => {}
            }
        }
        Reducer {
            op,
            kind,
            world,
            data,
            f,
            i,
        }
    }

    fn add(&mut self, buf: &[u8]) {
        match self.kind {
            Kind::Float => {
                for (a, c) in self.f.iter_mut().zip(buf.chunks_exact(4)) {
                    *a += f32_of(c) as f64;
                }
            }
            Kind::Double => {
                for (a, c) in self.f.iter_mut().zip(buf.chunks_exact(8)) {
                    *a += f64_of(c);
                }
            }
            Kind::Int64 => {
                for (a, c) in self.i.iter_mut().zip(buf.chunks_exact(8)) {
                    *a = a.wrapping_add(i64_of(c));
                }
            }
            _ => {}
        }
    }

    fn finish(self) -> &'a mut [u8] {
        let scale = if self.op == Op::Mean {
            1.0 / self.world as f64
        } else {
            1.0
        };
        if matches!(self.op, Op::Mean | Op::Sum) {
            match self.kind {
                Kind::Float => {
                    for (c, a) in self.data.chunks_exact_mut(4).zip(&self.f) {
                        c.copy_from_slice(&((a * scale) as f32).to_ne_bytes());
                    }
                }
                Kind::Double => {
                    for (c, a) in self.data.chunks_exact_mut(8).zip(&self.f) {
                        c.copy_from_slice(&(a * scale).to_ne_bytes());
                    }
                }
                Kind::Int64 => {
                    for (c, a) in self.data.chunks_exact_mut(8).zip(&self.i) {
                        c.copy_from_slice(&a.to_ne_bytes());
                    }
                }
                _ => {}
            }
        }
        self.data
    }
}

fn f32_of(c: &[u8]) -> f32 {
    f32::from_ne_bytes(c.try_into().expect("4 bytes"))
}
fn f64_of(c: &[u8]) -> f64 {
    f64::from_ne_bytes(c.try_into().expect("8 bytes"))
}
fn i64_of(c: &[u8]) -> i64 {
    i64::from_ne_bytes(c.try_into().expect("8 bytes"))
}

fn read_message(s: &mut TcpStream) -> std::io::Result<String> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len).min(64 * 1024) as usize;
    let mut b = vec![0u8; len];
    s.read_exact(&mut b)?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        check_kind(Op::Mean.name(), t, &[Kind::Float])?;
        self.run(Op::Mean, Some(t), 0)
    }

    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        check_kind(Op::Sum.name(), t, SUM_KINDS)?;
        self.run(Op::Sum, Some(t), 0)
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        check_root(Op::Broadcast.name(), root, self.world)?;
        let kinds = [
            Kind::Uint8,
            Kind::Int8,
            Kind::Int16,
            Kind::Int,
            Kind::Int64,
            Kind::Half,
            Kind::Float,
            Kind::Double,
            Kind::Bool,
            Kind::BFloat16,
        ];
        check_kind(Op::Broadcast.name(), t, &kinds)?;
        self.run(Op::Broadcast, Some(t), root)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.run(Op::Barrier, None, 0)
    }
}
