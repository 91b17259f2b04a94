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
//   ASSIGN_OR_RETURN(auto endpoint, kvx::transport::CreateLibfabricTransport(options));
//   // Advertise endpoint->address() and region descriptors; peers AddPeer() them.
//
// Limits honoured: writes longer than the provider's max_msg_size (or
// `max_write_bytes`) are split; at most min(`window`, tx_attr->size) writes are in
// flight and -FI_EAGAIN is retried while the completion queue is progressed; the
// mr_mode bits the provider returns are honoured (memory_registration.cc). One owner
// thread per endpoint posts and progresses, also when idle: tcp and shm make no
// progress on a target that does not read its completion queue.
// A transfer completes only when its data is at the target: its last write is posted
// with FI_DELIVERY_COMPLETE after all its other writes completed.
// README.md beside this file: variables, troubleshooting, measured figures.
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
  // Affect behavior.
  // Provider name as fi_info lists it; empty chooses the best available of efa,
  // verbs;ofi_rxm, tcp;ofi_rxm, shm and prints the choice.
  std::string provider;
  // Address to bind, e.g. "127.0.0.1"; empty lets the provider choose. Ignored by shm.
  std::string node;

  // Affect performance.
  // Writes in flight at most (capped by the provider's tx queue size).
  int64_t window = 64;
  // Split writes longer than this; 0 means the provider's max_msg_size (capped at 1 GiB).
  uint64_t max_write_bytes = 0;
  // Owner-thread sleep between completion-queue polls when idle; zero spins.
  absl::Duration idle_poll_interval = absl::Microseconds(50);
};

// Opens an endpoint. Errors: `Unavailable` the provider is absent or cannot bind the
// node; `FailedPrecondition` it lacks a capability (named in the message); the
// provider's error for any other failed call.
absl::StatusOr<std::unique_ptr<Transport>> CreateLibfabricTransport(
    const LibfabricOptions& options);

}  // namespace kvx::transport

#endif  // KVX_TRANSPORT_LIBFABRIC_LIBFABRIC_TRANSPORT_H_
