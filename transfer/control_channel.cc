#include "transfer/control_channel.h"

#include <sys/eventfd.h>
#include <sys/random.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>  // NOLINT(build/c++11): cppzmq's poll takes std::chrono
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "transfer/control_security.h"
#include "transfer/internal/curve_authenticator.h"
#include "zmq.hpp"

namespace kvx::transfer {
namespace {

using transfer_internal::CurveAuthenticator;

// A peer that is not up yet, or restarting, is retried soon, then less often.
constexpr int kReconnectIntervalMs = 10;
constexpr int kReconnectIntervalMaxMs = 1000;
// ZeroMQ routing ids, which carry this channel's address to its peers, are at most
// 255 bytes.
constexpr size_t kMaxRoutingIdBytes = 255;
// With CURVE a routing id is the address, a NUL, and this many random bytes, fresh
// for each peer socket (and kept across its reconnects). The ROUTER hands a routing
// id over to the newest connection that presents it (router_handover, below), so
// an id anyone knows could be taken over by any allowlisted peer, cutting its owner
// off; under CURVE the id travels encrypted and only the two ends ever see it.
constexpr size_t kRoutingNonceBytes = 16;

constexpr absl::string_view kTcpScheme = "tcp://";

// "tcp://HOST:PORT" with a printable HOST (a name, an IPv4 address, [IPv6], or "*"
// when binding) and a decimal PORT (0 only when binding). ZeroMQ's own parser
// accepts more (it reads port 99999 as 34463, and an empty host for connect), so
// addresses are checked here before it sees them.
absl::Status CheckAddress(absl::string_view address, bool bind) {
  const auto invalid = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed control address: ", why, ": address=", address));
  };
  if (!absl::StartsWith(address, kTcpScheme)) return invalid("not tcp://HOST:PORT");
  const absl::string_view host_port = address.substr(kTcpScheme.size());
  const size_t colon = host_port.rfind(':');
  if (colon == absl::string_view::npos) return invalid("no port");
  const absl::string_view host = host_port.substr(0, colon);
  const absl::string_view port = host_port.substr(colon + 1);
  if (host.empty()) return invalid("empty host");
  if (host == "*" && !bind) return invalid("wildcard host");
  for (char c : host) {
    if (c <= ' ' || c > '~') return invalid("host not printable");
  }
  uint32_t port_number = 0;
  if (port.empty() || port.size() > 5 ||
      !std::all_of(port.begin(), port.end(), absl::ascii_isdigit) ||
      !absl::SimpleAtoi(port, &port_number) || port_number > 65535) {
    return invalid("port not in [0, 65535]");
  }
  if (port_number == 0 && !bind) return invalid("port 0");
  return absl::OkStatus();
}

// Milliseconds for a ZeroMQ option or timeout: -1 for infinite, else rounded up
// (so a deadline is never cut short) and capped.
int64_t ToMilliseconds(absl::Duration d) {
  if (d == absl::InfiniteDuration()) return -1;
  if (d <= absl::ZeroDuration()) return 0;
  const absl::Duration capped =
      std::min(d, absl::Milliseconds(std::numeric_limits<int>::max()));
  return absl::ToInt64Milliseconds(absl::Ceil(capped, absl::Milliseconds(1)));
}

absl::Status ZmqStatus(absl::StatusCode code, absl::string_view what,
                       absl::string_view address, const zmq::error_t& e) {
  return absl::Status(code, absl::StrCat(what, ": address=", address, " errno=", e.num(),
                                         " error=", e.what()));
}

// A malformed endpoint is the caller's mistake; anything else is the environment.
absl::StatusCode EndpointErrorCode(const zmq::error_t& e, absl::StatusCode otherwise) {
  switch (e.num()) {
    case EINVAL:
    case EPROTONOSUPPORT:
    case ENOCOMPATPROTO:
      return absl::StatusCode::kInvalidArgument;
    default:
      return otherwise;
  }
}

absl::Status CheckOptions(const ControlChannelOptions& o) {
  if (o.send_high_water_mark < 0 || o.receive_high_water_mark < 0 ||
      o.send_timeout < absl::ZeroDuration() || o.linger < absl::ZeroDuration() ||
      o.max_messages_per_poll == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "invalid control channel options: send_high_water_mark=", o.send_high_water_mark,
        " receive_high_water_mark=", o.receive_high_water_mark, " send_timeout=",
        absl::FormatDuration(o.send_timeout), " linger=", absl::FormatDuration(o.linger),
        " max_messages_per_poll=", o.max_messages_per_poll));
  }
  if (absl::Status s = ValidateControlSecurity(o.security); !s.ok()) return s;
  return CheckAddress(o.bind_address, /*bind=*/true);
}

}  // namespace

struct ControlChannel::Impl {
  explicit Impl(const ControlChannelOptions& o)
      : options(o), curve(o.security.mode == ControlSecurity::Mode::kCurve) {}
  ~Impl() {
    // Sockets close (members, in reverse order) before the context terminates; the
    // ROUTER before its authenticator, so that no handshake finds it gone.
    if (wake_fd >= 0) close(wake_fd);
  }

  // Constant after Create.
  const ControlChannelOptions options;
  const bool curve;
  zmq::context_t context;
  std::string address;
  int wake_fd = -1;
  std::unique_ptr<CurveAuthenticator> authenticator;  // with CURVE only
  zmq::socket_t router;

  // Owner thread only. One DEALER per peer address, whose routing id is `address`
  // so that the peer's ROUTER sees who sent each message.
  absl::flat_hash_map<std::string, zmq::socket_t> peers;
  // With CURVE: peer address -> the allowlisted instance listening there.
  absl::flat_hash_map<std::string, std::string> instance_at;

  absl::StatusOr<zmq::socket_t*> Peer(absl::string_view peer_address);
  // Receives what has arrived without waiting, at most `budget` messages; returns
  // how many it appended (foreign, multi-frame messages are dropped).
  absl::StatusOr<size_t> Drain(size_t budget, std::vector<Incoming>* out);
  void ConsumeWake();
};

absl::StatusOr<zmq::socket_t*> ControlChannel::Impl::Peer(
    absl::string_view peer_address) {
  if (auto it = peers.find(peer_address); it != peers.end()) return &it->second;
  if (absl::Status s = CheckAddress(peer_address, /*bind=*/false); !s.ok()) return s;
  const std::string* server_key = nullptr;
  if (curve) {
    auto tied = instance_at.find(peer_address);
    if (tied == instance_at.end()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "no peer instance tied to the control address (SetPeerInstance): address=",
          peer_address));
    }
    server_key = &options.security.peers.at(tied->second);
  }
  try {
    zmq::socket_t dealer(context, zmq::socket_type::dealer);
    if (server_key != nullptr) {
      // A CURVE client that accepts only the server holding the secret key of
      // `server_key`, and proves this rank's own key to it.
      dealer.set(zmq::sockopt::curve_serverkey, *server_key);
      dealer.set(zmq::sockopt::curve_publickey, options.security.keys.public_key);
      dealer.set(zmq::sockopt::curve_secretkey, options.security.keys.secret_key);
    }
    std::string routing_id = address;
    if (curve) {
      char nonce[kRoutingNonceBytes];
      if (getrandom(nonce, sizeof(nonce), 0) != static_cast<ssize_t>(sizeof(nonce))) {
        return absl::InternalError(absl::StrCat("getrandom failed: errno=", errno,
                                                " error=", std::strerror(errno)));
      }
      routing_id.append(1, '\0').append(nonce, sizeof(nonce));
    }
    dealer.set(zmq::sockopt::routing_id, routing_id);
    dealer.set(zmq::sockopt::sndhwm, options.send_high_water_mark);
    dealer.set(zmq::sockopt::sndtimeo,
               static_cast<int>(ToMilliseconds(options.send_timeout)));
    dealer.set(zmq::sockopt::linger, static_cast<int>(ToMilliseconds(options.linger)));
    // Queue for a peer that is not connected yet instead of refusing (a rank may
    // send its handshake before the peer has bound); ZeroMQ's default, said
    // explicitly because the opposite is a plausible-looking "fix".
    dealer.set(zmq::sockopt::immediate, false);
    dealer.set(zmq::sockopt::reconnect_ivl, kReconnectIntervalMs);
    dealer.set(zmq::sockopt::reconnect_ivl_max, kReconnectIntervalMaxMs);
    dealer.connect(std::string(peer_address));
    return &peers.emplace(std::string(peer_address), std::move(dealer)).first->second;
  } catch (const zmq::error_t& e) {
    return ZmqStatus(EndpointErrorCode(e, absl::StatusCode::kInternal),
                     "cannot connect to control peer", peer_address, e);
  }
}

absl::StatusOr<size_t> ControlChannel::Impl::Drain(size_t budget,
                                                   std::vector<Incoming>* out) {
  size_t appended = 0;
  try {
    // Bounded by messages received, dropped ones included, so that a flood of
    // foreign messages cannot keep the owner thread here either.
    for (size_t received = 0; received < budget; ++received) {
      zmq::message_t from;
      if (!router.recv(from, zmq::recv_flags::dontwait)) break;  // nothing more
      // A ROUTER delivers [routing id, frames...] atomically: the rest is there.
      zmq::message_t body;
      if (!from.more() || !router.recv(body, zmq::recv_flags::dontwait)) continue;
      // Our peers send one frame; a multi-frame message is not ours: drop it whole.
      const bool single_frame = !body.more();
      for (bool more = body.more(); more;) {
        zmq::message_t extra;
        more = router.recv(extra, zmq::recv_flags::dontwait) && extra.more();
      }
      if (!single_frame) continue;
      std::string sender = from.to_string();
      std::string peer_instance;
      if (curve) {
        // Set by the authenticator from the key the sender proved; a message
        // without it did not pass authentication (it cannot happen): drop it.
        const char* user_id = zmq_msg_gets(body.handle(), "User-Id");
        if (user_id == nullptr || *user_id == '\0') continue;
        peer_instance = user_id;
        sender.resize(std::min(sender.size(), sender.find('\0')));  // drop the nonce
      }
      out->push_back(Incoming{std::move(sender), body.to_string(), std::move(peer_instance)});
      ++appended;
    }
  } catch (const zmq::error_t& e) {
    return ZmqStatus(absl::StatusCode::kInternal, "control channel receive failed",
                     address, e);
  }
  return appended;
}

void ControlChannel::Impl::ConsumeWake() {
  uint64_t count = 0;
  // Non-blocking: EAGAIN when no Wake() is pending, which is fine.
  (void)!read(wake_fd, &count, sizeof(count));
}

absl::StatusOr<std::unique_ptr<ControlChannel>> ControlChannel::Create(
    const ControlChannelOptions& options) {
  if (absl::Status s = CheckOptions(options); !s.ok()) return s;
  auto impl = std::make_unique<Impl>(options);
  impl->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (impl->wake_fd < 0) {
    return absl::InternalError(
        absl::StrCat("eventfd failed: errno=", errno, " error=", std::strerror(errno)));
  }
  try {
    impl->router = zmq::socket_t(impl->context, zmq::socket_type::router);
    impl->router.set(zmq::sockopt::linger, 0);  // the ROUTER never sends
    impl->router.set(zmq::sockopt::maxmsgsize, static_cast<int64_t>(std::min<size_t>(
                                                   options.max_message_bytes,
                                                   std::numeric_limits<int64_t>::max())));
    impl->router.set(zmq::sockopt::rcvhwm, options.receive_high_water_mark);
    // A peer that reconnects (after Disconnect, or restarted on the same address)
    // presents the routing id of its old connection; without handover ZeroMQ
    // would refuse the new one while the old one lingers, losing its messages.
    impl->router.set(zmq::sockopt::router_handover, true);
  } catch (const zmq::error_t& e) {
    return ZmqStatus(absl::StatusCode::kInternal, "cannot create control socket",
                     options.bind_address, e);
  }
  if (impl->curve) {
    // Before the bind: a connection accepted before the handler listens would not
    // be authenticated.
    absl::StatusOr<std::unique_ptr<CurveAuthenticator>> authenticator =
        CurveAuthenticator::Create(impl->context, impl->router, options.security,
                                   options.log);
    if (!authenticator.ok()) return authenticator.status();
    impl->authenticator = *std::move(authenticator);
  }
  try {
    impl->router.bind(options.bind_address);
    impl->address = impl->router.get(zmq::sockopt::last_endpoint);
  } catch (const zmq::error_t& e) {
    return ZmqStatus(EndpointErrorCode(e, absl::StatusCode::kUnavailable),
                     "cannot bind control socket", options.bind_address, e);
  }
  const size_t max_address_bytes =
      kMaxRoutingIdBytes - (impl->curve ? 1 + kRoutingNonceBytes : 0);
  if (impl->address.size() > max_address_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("control address too long for a routing id: address=", impl->address,
                     " bytes=", impl->address.size(), " max=", max_address_bytes));
  }
  if (impl->authenticator != nullptr) impl->authenticator->Start(impl->address);
  return std::unique_ptr<ControlChannel>(new ControlChannel(std::move(impl)));
}

ControlChannel::ControlChannel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

ControlChannel::~ControlChannel() = default;

const std::string& ControlChannel::address() const { return impl_->address; }

absl::Status ControlChannel::Send(absl::string_view peer_address,
                                  absl::string_view bytes) {
  absl::StatusOr<zmq::socket_t*> peer = impl_->Peer(peer_address);
  if (!peer.ok()) return peer.status();
  try {
    if (!(*peer)->send(zmq::const_buffer(bytes.data(), bytes.size()),
                       zmq::send_flags::none)) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "control queue to peer full: peer=", peer_address,
          " send_high_water_mark=", impl_->options.send_high_water_mark,
          " send_timeout=", absl::FormatDuration(impl_->options.send_timeout)));
    }
  } catch (const zmq::error_t& e) {
    return ZmqStatus(absl::StatusCode::kInternal, "control send failed", peer_address, e);
  }
  return absl::OkStatus();
}

absl::Status ControlChannel::SetPeerInstance(absl::string_view peer_address,
                                             absl::string_view instance) {
  if (absl::Status s = CheckAddress(peer_address, /*bind=*/false); !s.ok()) return s;
  if (!impl_->curve) return absl::OkStatus();
  if (impl_->options.security.peers.count(std::string(instance)) == 0) {
    return absl::NotFoundError(absl::StrCat("peer instance not in the curve allowlist: instance=",
                                            instance, " address=", peer_address));
  }
  auto [it, inserted] = impl_->instance_at.try_emplace(peer_address, instance);
  if (!inserted && it->second != instance) {
    // Not re-tied on a later word: a peer that claims another's address must not
    // cut that instance off (its connection and queue stay as they are).
    return absl::FailedPreconditionError(absl::StrCat(
        "control address is tied to another instance (Disconnect it first): address=",
        peer_address, " instance=", instance, " tied_to=", it->second));
  }
  return absl::OkStatus();
}

void ControlChannel::Disconnect(absl::string_view peer_address) {
  impl_->instance_at.erase(peer_address);
  auto it = impl_->peers.find(peer_address);
  if (it == impl_->peers.end()) return;
  try {
    it->second.set(zmq::sockopt::linger, 0);  // drop what is queued
  } catch (const zmq::error_t&) {
    // Closing still drops the peer; only the queued messages may flush first.
  }
  impl_->peers.erase(it);
}

absl::Status ControlChannel::Poll(absl::Time deadline, std::vector<Incoming>* out) {
  const size_t budget = impl_->options.max_messages_per_poll;
  zmq::pollitem_t items[] = {
      {impl_->router.handle(), 0, ZMQ_POLLIN, 0},
      {nullptr, impl_->wake_fd, ZMQ_POLLIN, 0},
  };
  for (;;) {
    absl::StatusOr<size_t> drained = impl_->Drain(budget, out);
    if (!drained.ok() || *drained > 0) return drained.status();
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) return absl::OkStatus();
    try {
      zmq::poll(items, std::size(items), std::chrono::milliseconds(ToMilliseconds(left)));
    } catch (const zmq::error_t& e) {
      if (e.num() == EINTR) continue;
      return ZmqStatus(absl::StatusCode::kInternal, "control poll failed", impl_->address,
                       e);
    }
    if (items[1].revents & ZMQ_POLLIN) {
      impl_->ConsumeWake();
      return impl_->Drain(budget, out).status();
    }
  }
}

ControlChannel::SecurityStats ControlChannel::security_stats() const {
  if (impl_->authenticator == nullptr) return {};
  const CurveAuthenticator::Stats stats = impl_->authenticator->stats();
  return SecurityStats{stats.refused_connections, stats.refused_keys};
}

void ControlChannel::Wake() {
  const uint64_t one = 1;
  // EAGAIN only when the counter is saturated: a wake is pending anyway.
  (void)!write(impl_->wake_fd, &one, sizeof(one));
}

}  // namespace kvx::transfer
