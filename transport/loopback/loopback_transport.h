// File: transport/loopback/loopback_transport.h
//
// An in-process Transport: endpoints in one process write into each other's
// registered memory with memcpy. Same semantics as the libfabric backend (the same
// WriteEngine does bounds checks, splitting, windows, deadlines and error messages;
// the target checks the key and range of every write), so unit tests run fast and
// without a network, and benchmarks have a ceiling to compare against.
//
//   ASSIGN_OR_RETURN(auto a, kvx::transport::CreateLoopbackTransport());
//   ASSIGN_OR_RETURN(auto b, kvx::transport::CreateLoopbackTransport());
//   ASSIGN_OR_RETURN(kvx::transport::PeerId peer, a->AddPeer(b->address()));
//
// Addresses are valid only inside the process that created them. A write to an
// endpoint that was destroyed fails with `Unavailable`; a wrong key fails with
// `PermissionDenied`; a range outside the target region with `OutOfRange`.
// Deregistering a region on the target waits for a memcpy into it to finish.
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

struct LoopbackOptions {
  // Writes longer than this are split into pieces (as a provider's max_msg_size).
  uint64_t max_write_bytes = uint64_t{1} << 30;
  // Pieces in flight at most.
  int64_t window = 64;
  // Owner-thread sleep between polls when idle; zero spins.
  absl::Duration idle_poll_interval = absl::Microseconds(50);
};

// Creates an endpoint. Never fails today; returns StatusOr like every backend factory.
absl::StatusOr<std::unique_ptr<Transport>> CreateLoopbackTransport(
    const LoopbackOptions& options = LoopbackOptions());

}  // namespace kvx::transport

#endif  // KVX_TRANSPORT_LOOPBACK_LOOPBACK_TRANSPORT_H_
