// File: transport/libfabric/libfabric_transport.h
//
// A Transport over libfabric: FI_EP_RDM endpoints with FI_RMA writes, on the provider
// named in the options (`efa`, `verbs;ofi_rxm`, `tcp;ofi_rxm`, `shm`) or the best one
// available (printed to stderr). A provider that lacks what we need is refused with
// the reason; there is no silent fallback to another provider.
//
//   kvx::transport::LibfabricOptions options;
//   options.provider = "tcp;ofi_rxm";
//   options.node = "127.0.0.1";  // Tests bind loopback only.
//   absl::StatusOr<std::unique_ptr<kvx::transport::Transport>> endpoint =
//       kvx::transport::CreateLibfabricTransport(options);
//   // Advertise (*endpoint)->address(); grant each writing peer its region.
//
// Limits honoured: writes longer than the provider's max_msg_size (or
// `max_write_bytes`) are split; per peer at most `peer_window` writes, on the
// endpoint at most the provider's tx queue size, are in flight, and -FI_EAGAIN makes
// the owner thread move on to the next peer and retry later; the mr_mode bits the
// provider returns are honoured (memory_registration.cc). One owner thread per
// endpoint posts and progresses, also when idle: tcp and shm make no progress on a
// target that does not read its completion queue.
// A transfer completes only when its data is at the target: its last write is posted
// with FI_DELIVERY_COMPLETE after all its other writes completed.
// How the transport.h guarantees map onto each provider (keys, fences, what a
// provider cannot refuse): README.md beside this file.
//
// Thread safety: as Transport (all methods thread-safe).

#ifndef KVX_TRANSPORT_LIBFABRIC_LIBFABRIC_TRANSPORT_H_
#define KVX_TRANSPORT_LIBFABRIC_LIBFABRIC_TRANSPORT_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "transport/transport.h"

namespace kvx::transport {

struct LibfabricOptions {
  // Provider name as fi_info lists it; empty chooses the best available of efa,
  // verbs;ofi_rxm, tcp;ofi_rxm, shm and prints the choice.
  std::string provider;
  // Address to bind, e.g. "127.0.0.1"; empty lets the provider choose. Ignored by shm,
  // whose endpoints get a unique random name.
  std::string node;
  // Windows, bounds, timeouts. max_in_flight is capped at the provider's tx queue
  // size (0: that size), max_write_bytes at its max_msg_size and 1 GiB (0: that).
  EndpointOptions endpoint;
};

// Opens an endpoint. Errors: `Unavailable` the provider is absent or cannot bind the
// node; `FailedPrecondition` it lacks a capability (named in the message); the
// provider's error for any other failed call.
absl::StatusOr<std::unique_ptr<Transport>> CreateLibfabricTransport(
    const LibfabricOptions& options);

}  // namespace kvx::transport

#endif  // KVX_TRANSPORT_LIBFABRIC_LIBFABRIC_TRANSPORT_H_
