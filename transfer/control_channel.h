// File: transfer/control_channel.h
//
// A rank's control-plane endpoint over ZeroMQ (no ZeroMQ type appears here): one
// ROUTER socket bound to `bind_address` receives every message sent to this rank,
// and one DEALER socket per peer rank, connected on first use, sends to it. Every
// message is one opaque byte string (the protocol codec's, transfer/protocol.h);
// messages from one peer arrive in the order it sent them.
//
//   ControlChannelOptions options;
//   options.bind_address = "tcp://127.0.0.1:0";  // port 0: the kernel picks one
//   absl::StatusOr<std::unique_ptr<ControlChannel>> channel = ControlChannel::Create(options);
//   std::string me = (*channel)->address();       // "tcp://127.0.0.1:41235"
//   absl::Status sent = (*channel)->Send(peer_address, EncodeMessage(message));
//   std::vector<ControlChannel::Incoming> in;
//   absl::Status polled = (*channel)->Poll(absl::Now() + absl::Milliseconds(5), &in);
//
// Untrusted input: a message over `max_message_bytes` is dropped by ZeroMQ before it
// is read (ZMQ_MAXMSGSIZE), and a peer that floods us is bounded by the receive high
// water mark and by `max_messages_per_poll`. `Incoming::from` is the identity the
// peer declared: a hint for logs, not a proof (the protocol's messages name their
// sender and the session checks them against the handshake).
//
// Delivery: in order per peer, and best effort. A message sent to a peer that is
// not up yet waits in its queue and goes out once the peer binds. ZeroMQ closes a
// connection that carried an oversize message (the sender reconnects by itself), so
// messages the peer sent right after that one may be lost with it; messages in
// flight when a peer restarts may be lost too. The protocol above never relies on
// delivery: every wait has a deadline.
//
// Thread safety: one thread (the owner) calls everything except Wake(), which any
// thread may call to make a Poll in progress return.

#ifndef KVX_TRANSFER_CONTROL_CHANNEL_H_
#define KVX_TRANSFER_CONTROL_CHANNEL_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/attributes.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace kvx::transfer {

struct ControlChannelOptions {
  // A ZeroMQ tcp endpoint to bind, "tcp://HOST:PORT" with an interface address
  // (IPv6 in brackets) or "*" for all; port 0 picks a free one. Tests and tools
  // bind 127.0.0.1 only. Bind a concrete address: address() is what peers send to.
  std::string bind_address = "tcp://127.0.0.1:0";
  // Messages larger than this are dropped on receipt (and the connection that
  // carried one is closed; the sender reconnects).
  size_t max_message_bytes = size_t{64} << 20;
  // Messages queued per peer (each direction) before Send refuses. >= 0; 0 means
  // no bound.
  int send_high_water_mark = 100000;
  int receive_high_water_mark = 100000;
  // How long Send may wait on a full queue before ResourceExhausted; and how long
  // closing a connection (the destructor) waits to flush what is queued
  // (ZMQ_LINGER). Neither may be negative; InfiniteDuration() waits forever.
  absl::Duration send_timeout = absl::ZeroDuration();
  absl::Duration linger = absl::Milliseconds(200);
  // Most messages one Poll returns, so that a flooding peer cannot keep the owner
  // thread inside one Poll. >= 1.
  size_t max_messages_per_poll = 4096;
};

class ControlChannel {
 public:
  // Binds the ROUTER socket. Errors: InvalidArgument for a malformed address or
  // option; Unavailable when it cannot bind (in use, not local); Internal for
  // another ZeroMQ or system failure (the message names it).
  ABSL_MUST_USE_RESULT static absl::StatusOr<std::unique_ptr<ControlChannel>> Create(
      const ControlChannelOptions& options);

  // Closes every socket, waiting up to `linger` for queued messages to go out.
  // REQUIRES: no Wake() in progress or after.
  ~ControlChannel();
  ControlChannel(const ControlChannel&) = delete;
  ControlChannel& operator=(const ControlChannel&) = delete;

  // The address peers send to, with the port resolved ("tcp://127.0.0.1:41235").
  const std::string& address() const;

  // Queues `bytes` for the peer at `peer_address` ("tcp://HOST:PORT", port > 0;
  // connecting on first use; the connection comes up, and reconnects, in the
  // background). Never blocks longer than `send_timeout`. Errors: InvalidArgument
  // for a malformed address; ResourceExhausted when the peer's queue is full (it is
  // not reading, or not up); Internal for another ZeroMQ failure.
  ABSL_MUST_USE_RESULT absl::Status Send(absl::string_view peer_address,
                                         absl::string_view bytes);

  // Drops the connection to `peer_address` and what is still queued for it; the next
  // Send connects again. No-op for a peer never sent to.
  void Disconnect(absl::string_view peer_address);

  struct Incoming {
    std::string from;   // the sender's declared identity: its control address
    std::string bytes;  // the message
  };

  // Appends every message that has arrived to `out` (up to max_messages_per_poll),
  // waiting until at least one has, Wake() was called, or `deadline` passes (returns
  // OK then, with nothing appended). A deadline in the past only collects what has
  // arrived. Errors: Internal for a ZeroMQ failure (the message names it).
  // REQUIRES: out != nullptr.
  ABSL_MUST_USE_RESULT absl::Status Poll(absl::Time deadline, std::vector<Incoming>* out);

  // Makes the current (or next) Poll return. Several Wake() calls before a Poll
  // returns count as one. Thread-safe, cheap (one eventfd write).
  void Wake();

 private:
  struct Impl;
  explicit ControlChannel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvx::transfer

#endif  // KVX_TRANSFER_CONTROL_CHANNEL_H_
