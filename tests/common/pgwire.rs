//! The Postgres wire protocol by hand, for what no driver sends: a message that never ends, a
//! client that never reads.

use std::io::{Read, Write};
use std::net::TcpStream;

/// A frontend message: type byte, length, body.
pub fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    [&[kind][..], &(body.len() as u32 + 4).to_be_bytes(), body].concat()
}

/// Logs `socket` in as `bearwatch` with `password` and reads up to the first ReadyForQuery.
pub fn login(mut socket: TcpStream, password: &str) -> TcpStream {
    let startup = [&196_608u32.to_be_bytes()[..], b"user\0bearwatch\0database\0bearwatch\0\0"].concat();
    socket.write_all(&[&(startup.len() as u32 + 4).to_be_bytes()[..], &startup].concat()).unwrap();
    let mut asked = [0u8; 9];
    socket.read_exact(&mut asked).unwrap();
    assert_eq!((asked[0], &asked[5..]), (b'R', &3u32.to_be_bytes()[..]), "a cleartext password request");
    socket.write_all(&message(b'p', &[password.as_bytes(), b"\0"].concat())).unwrap();
    let mut login = Vec::new();
    while !login.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
        let mut byte = [0u8; 1];
        socket.read_exact(&mut byte).unwrap();
        login.push(byte[0]);
    }
    socket
}
