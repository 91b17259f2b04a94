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
// Security (transfer/control_security.h, transfer/CONTROL_PLANE.md): off by default,
// so any process that reaches the port may send. With CURVE, every connection is
// encrypted; the ROUTER accepts only clients that prove a public key of the
// allowlist (a refused one is counted and logged, and none of its messages is ever
// read), and each message says which allowlisted instance sent it
// (`Incoming::peer_instance`, proven, unlike `from`). Sending needs the instance
// that listens at an address (SetPeerInstance): the connection is made with that
// instance's public key as the server key, so only the holder of its secret key can
// accept it and read what is sent.
//
//   options.security = *LoadCurveSecurity(key_dir, "decode-0");  // curve_key_files.h
//   auto channel = ControlChannel::Create(options);
//   absl::Status tied = (*channel)->SetPeerInstance(prefill_address, "prefill-0");
//   absl::Status sent = (*channel)->Send(prefill_address, bytes);
//
// Delivery: in order per peer, and best effort. A message sent to a peer that is
// not up yet waits in its queue and goes out once the peer binds. ZeroMQ closes a
// connection that carried an oversize message (the sender reconnects by itself), so
// messages the peer sent right after that one may be lost with it; messages in
// flight when a peer restarts may be lost too. The protocol above never relies on
// delivery: every wait has a deadline.
//
// Thread safety: one thread (the owner) calls everything except Wake(), which any
// thread may call to make a Poll in progress return, and security_stats(). With
// CURVE an internal thread authenticates incoming connections (it calls `log`).

#ifndef KVX_TRANSFER_CONTROL_CHANNEL_H_
#define KVX_TRANSFER_CONTROL_CHANNEL_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/attributes.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "transfer/control_security.h"

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
  // Off, or CURVE with this rank's keys and its allowlist of peer instances
  // (validated by Create, ValidateControlSecurity).
  ControlSecurity security;
  // Where refused connections are reported, one line each (without a newline);
  // empty: stderr. Called on an internal thread; must not block.
  std::function<void(absl::string_view line)> log;
};

class ControlChannel {
 public:
  // Binds the ROUTER socket (with CURVE, after its authenticator is listening).
  // Errors: InvalidArgument for a malformed address or option, or invalid security
  // (ValidateControlSecurity's errors); Unimplemented for CURVE on a libzmq without
  // it; Unavailable when it cannot bind (in use, not local); Internal for another
  // ZeroMQ or system failure (the message names it).
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
  // for a malformed address; FailedPrecondition with CURVE when no instance is tied
  // to the address (SetPeerInstance); ResourceExhausted when the peer's queue is
  // full (it is not reading, or not up, or, with CURVE, it cannot prove the key of
  // its instance); Internal for another ZeroMQ failure.
  ABSL_MUST_USE_RESULT absl::Status Send(absl::string_view peer_address,
                                         absl::string_view bytes);

  // With CURVE, ties `peer_address` to the allowlisted `instance` listening there:
  // Send connects to it with that instance's public key as the server key. A tie
  // lasts until Disconnect. With security off it checks the address and does
  // nothing else. Errors: InvalidArgument for a malformed address; NotFound when
  // `instance` is not in the allowlist; FailedPrecondition when the address is tied
  // to another instance (Disconnect it first).
  ABSL_MUST_USE_RESULT absl::Status SetPeerInstance(absl::string_view peer_address,
                                                    absl::string_view instance);

  // Drops the connection to `peer_address`, what is still queued for it, and its
  // tie to an instance; the next Send connects again. No-op for an unknown peer.
  // libzmq closes the old socket in the background, so a message queued before
  // may still reach a peer that comes up at that moment: the protocol treats such
  // a late message as any other stray one.
  void Disconnect(absl::string_view peer_address);

  struct Incoming {
    std::string from;   // the sender's declared identity: its control address
    std::string bytes;  // the message
    // With CURVE, the allowlisted instance whose key the sender proved; empty when
    // security is off.
    std::string peer_instance;
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

  // Incoming connections refused since Create; all zero when security is off.
  struct SecurityStats {
    // Handshakes that failed: a key that does not prove itself, a client without
    // CURVE, a key not in the allowlist, a client that hung up half-way.
    int64_t refused_connections = 0;
    // Of those, clients that proved a key that is not in the allowlist.
    int64_t refused_keys = 0;
  };
  // Thread-safe.
  SecurityStats security_stats() const;

 private:
  struct Impl;
  explicit ControlChannel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvx::transfer

#endif  // KVX_TRANSFER_CONTROL_CHANNEL_H_
