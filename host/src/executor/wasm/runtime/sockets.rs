//! Where Flotilla's WASI sockets differ from wasmtime-wasi's.
//!
//! **A connection reset before the guest accepts it is not handed over.**
//! The kernel keeps such a connection in the listener's queue and
//! `accept(2)` returns it, but it has no peer any more. wasmtime-wasi hands
//! it to the guest; wasi-libc's `accept` (what Rust's std, C and most
//! toolchains use on WASI 0.2) then asks for the peer's address, gets
//! `invalid-state`, and calls `abort()` — the guest traps. So any client
//! able to connect could kill a wasm server with one reset. Here `accept`
//! drops such a connection and answers `connection-aborted`
//! (`ECONNABORTED`, which a POSIX server skips), as a listening socket on
//! a host would never have offered it.

use super::Host;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::p2::bindings::sockets::network::ErrorCode;
use wasmtime_wasi::p2::bindings::sockets::tcp::HostTcpSocket;
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, SocketError, TcpSocket};
use wasmtime_wasi::sockets::WasiSocketsView;

/// The tcp interface as wasmtime-wasi 48 registers it (guests importing any
/// 0.2.x version are linked to it).
const TCP: &str = "wasi:sockets/tcp@0.2.12";

type Accepted = (
    Resource<TcpSocket>,
    Resource<DynInputStream>,
    Resource<DynOutputStream>,
);

/// Replaces `tcp-socket.accept` in `linker` (which must hold the WASI 0.2
/// interfaces already).
pub fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    linker.instance(TCP)?.func_wrap(
        "[method]tcp-socket.accept",
        |mut store, (this,): (Resource<TcpSocket>,)| {
            let mut view = store.data_mut().sockets();
            Ok((settle(accept(&mut view, this))?,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Error codes go to the guest; anything else traps it, as in the
/// original.
fn settle<T>(r: Result<T, SocketError>) -> wasmtime::Result<Result<T, ErrorCode>> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(e) => e.downcast().map(Err),
    }
}

fn accept(
    view: &mut wasmtime_wasi::sockets::WasiSocketsCtxView<'_>,
    this: Resource<TcpSocket>,
) -> Result<Accepted, SocketError> {
    let (socket, input, output) = HostTcpSocket::accept(view, this)?;
    let borrowed = Resource::new_borrow(socket.rep());
    if HostTcpSocket::remote_address(view, borrowed).is_ok() {
        return Ok((socket, input, output));
    }
    // Reset while queued: gone before the guest could see it. The streams
    // are the socket's children, so they go first.
    view.table.delete(input)?;
    view.table.delete(output)?;
    view.table.delete(socket)?;
    Err(ErrorCode::ConnectionAborted.into())
}
