// File: transport/loopback/loopback_transport.h
//
// An in-process Transport: endpoints in one process write into each other's
// registered memory with memcpy. Same semantics as the libfabric backend (the same
// WriteEngine does bounds checks, splitting, windows, deadlines and error messages;
// the target checks the key and range of every write), so unit tests run fast and
// without a network, and benchmarks have a ceiling to compare against.
//
//   absl::StatusOr<std::unique_ptr<kvx::transport::Transport>> a =
//       kvx::transport::CreateLoopbackTransport();
//   absl::StatusOr<std::unique_ptr<kvx::transport::Transport>> b =
//       kvx::transport::CreateLoopbackTransport();
//   absl::StatusOr<kvx::transport::PeerId> peer = (*a)->AddPeer((*b)->address());
//
// Addresses are valid only inside the process that created them. The target checks
// every write against its grants: the key, the one writer the key was granted to, and
// the range. A refused write, and a write to an endpoint that was destroyed, fail
// with `Unavailable` (transport.h, semantics 8). A write is one memcpy on the
// initiator's owner thread under the target's lock, so revoking a grant (RemovePeer)
// waits for a copy through it to finish and nothing lands afterwards.
//
// Thread safety: as Transport (all methods thread-safe).

#ifndef KVX_TRANSPORT_LOOPBACK_LOOPBACK_TRANSPORT_H_
#define KVX_TRANSPORT_LOOPBACK_LOOPBACK_TRANSPORT_H_

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "transport/transport.h"

namespace kvx::transport {

// Creates an endpoint. Defaults: writes are split at 1 GiB; at most 1024 pieces in
// flight. Never fails today; returns StatusOr like every backend factory.
absl::StatusOr<std::unique_ptr<Transport>> CreateLoopbackTransport(
    const EndpointOptions& options = EndpointOptions());

}  // namespace kvx::transport

#endif  // KVX_TRANSPORT_LOOPBACK_LOOPBACK_TRANSPORT_H_
