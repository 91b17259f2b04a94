#include "transfer/internal/curve_authenticator.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>  // NOLINT(build/c++11): cppzmq's poll takes std::chrono
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "transfer/control_security.h"
#include "zmq.h"
#include "zmq.hpp"

namespace kvx::transfer_internal {
namespace {

// Fixed by ZeroMQ: where a context's server sockets look for their handler.
constexpr char kZapEndpoint[] = "inproc://zeromq.zap.01";
// inproc names are per context, and each channel has a context of its own.
constexpr char kMonitorEndpoint[] = "inproc://kvx.control.handshakes";
// The ZAP domain the ROUTER asks under; nothing else in the context asks.
constexpr char kZapDomain[] = "kvx";
constexpr size_t kCurveKeyBytes = 32;
// A ZAP request has 7 frames for CURVE; more is not libzmq talking.
constexpr size_t kMaxZapFrames = 16;
// Keys and reasons whose refusals are counted one by one; past it, together.
constexpr size_t kMaxTrackedRefusals = 1024;

bool PowerOfTwo(int64_t n) { return n > 0 && (n & (n - 1)) == 0; }

std::string Z85(const std::string& key_bytes) {
  char text[transfer::kCurveKeyZ85Chars + 1];
  if (key_bytes.size() != kCurveKeyBytes ||
      zmq_z85_encode(text, reinterpret_cast<const uint8_t*>(key_bytes.data()),
                     key_bytes.size()) == nullptr) {
    return "(not a curve key)";
  }
  return text;
}

std::string KeyBytes(const std::string& z85) {
  uint8_t bytes[kCurveKeyBytes];
  // Validated by ValidateControlSecurity: decoding cannot fail.
  zmq_z85_decode(bytes, z85.c_str());
  return std::string(reinterpret_cast<const char*>(bytes), kCurveKeyBytes);
}

// Why a handshake failed, from a monitor event, in words an operator can act on.
std::string HandshakeFailure(uint16_t event, uint32_t value) {
  if (event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL) {
    switch (value) {
      case ZMQ_PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
        return "the client's CURVE keys failed (a secret key that does not match its public "
               "key, or it dialed with another server key)";
      case ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return "the client does not use CURVE (security off, or another mechanism)";
      default:
        return absl::StrCat("protocol error=0x", absl::Hex(value));
    }
  }
  // A client without CURVE may see the mechanisms differ first and close.
  return "the client closed the connection or timed out during the handshake (or does not "
         "use CURVE)";
}

}  // namespace

absl::StatusOr<std::unique_ptr<CurveAuthenticator>> CurveAuthenticator::Create(
    zmq::context_t& context, zmq::socket_t& router, const transfer::ControlSecurity& security,
    Log log) {
  std::unique_ptr<CurveAuthenticator> self(new CurveAuthenticator());
  self->log_ = std::move(log);
  for (const auto& [instance, key] : security.peers) {
    self->instance_by_key_[KeyBytes(key)] = instance;
  }
  self->stop_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (self->stop_fd_ < 0) {
    return absl::InternalError(
        absl::StrCat("eventfd failed: errno=", errno, " error=", std::strerror(errno)));
  }
  try {
    self->zap_ = zmq::socket_t(context, zmq::socket_type::rep);
    self->zap_.set(zmq::sockopt::linger, 0);
    self->zap_.bind(kZapEndpoint);
    router.set(zmq::sockopt::curve_server, true);
    router.set(zmq::sockopt::curve_secretkey, security.keys.secret_key);
    router.set(zmq::sockopt::zap_domain, kZapDomain);
    // Not ZMQ_EVENT_HANDSHAKE_FAILED_AUTH: those are the refusals AnswerZap makes,
    // counted there already (and there first, so a caller who saw one logged sees
    // it counted).
    if (zmq_socket_monitor(router.handle(), kMonitorEndpoint,
                           ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL |
                               ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL) != 0) {
      throw zmq::error_t();
    }
    self->monitor_ = zmq::socket_t(context, zmq::socket_type::pair);
    self->monitor_.set(zmq::sockopt::linger, 0);
    self->monitor_.connect(kMonitorEndpoint);
  } catch (const zmq::error_t& e) {
    return absl::InternalError(absl::StrCat("cannot set up curve authentication: errno=",
                                            e.num(), " error=", e.what()));
  }
  return self;
}

void CurveAuthenticator::Start(std::string address) {
  address_ = std::move(address);
  thread_ = std::thread([this] { Run(); });
}

CurveAuthenticator::~CurveAuthenticator() {
  if (thread_.joinable()) {
    const uint64_t one = 1;
    (void)!write(stop_fd_, &one, sizeof(one));
    thread_.join();
  }
  if (stop_fd_ >= 0) close(stop_fd_);
}

CurveAuthenticator::Stats CurveAuthenticator::stats() const {
  return Stats{refused_connections_.load(std::memory_order_relaxed),
               refused_keys_.load(std::memory_order_relaxed)};
}

void CurveAuthenticator::Run() {
  zmq::pollitem_t items[] = {
      {zap_.handle(), 0, ZMQ_POLLIN, 0},
      {monitor_.handle(), 0, ZMQ_POLLIN, 0},
      {nullptr, stop_fd_, ZMQ_POLLIN, 0},
  };
  for (;;) {
    try {
      zmq::poll(items, std::size(items), std::chrono::milliseconds(-1));
      if (items[2].revents & ZMQ_POLLIN) return;
      if (items[0].revents & ZMQ_POLLIN) AnswerZap();
      if (items[1].revents & ZMQ_POLLIN) ReadMonitor();
    } catch (const zmq::error_t& e) {
      // Nothing here is the peer's doing (libzmq frames ZAP and monitor messages);
      // say so and keep serving: giving up would stall every later handshake.
      if (e.num() == EINTR) continue;
      if (const int64_t n = Tally(absl::StrCat("errno ", e.num())); PowerOfTwo(n)) {
        Write(absl::StrCat("curve authenticator failed: errno=", e.num(), " error=", e.what(),
                           " failures=", n));
      }
    }
  }
}

void CurveAuthenticator::AnswerZap() {
  // Every frame of the request, so that the REP socket can answer it.
  std::vector<zmq::message_t> frames;
  for (bool more = true; more;) {
    zmq::message_t frame;
    if (!zap_.recv(frame, zmq::recv_flags::dontwait)) return;  // spurious wake-up
    more = frame.more();
    if (frames.size() < kMaxZapFrames) frames.push_back(std::move(frame));
  }
  // RFC 27: version, request id, domain, address, identity, mechanism, credentials.
  const auto text = [&](size_t i) {
    return i < frames.size() ? frames[i].to_string() : std::string();
  };
  std::string user_id;
  std::string status = "400";
  std::string reason;
  if (text(0) != "1.0" || frames.size() < 7 || text(2) != kZapDomain || text(5) != "CURVE" ||
      frames[6].size() != kCurveKeyBytes) {
    reason = "not a CURVE request of this channel";
    ++refused_connections_;
    if (const int64_t n = Tally("zap:malformed"); PowerOfTwo(n)) {
      Write(absl::StrCat("refused a malformed authentication request: mechanism=", text(5),
                         " refusals=", n));
    }
  } else if (auto it = instance_by_key_.find(frames[6].to_string());
             it == instance_by_key_.end()) {
    reason = "key not in the allowlist";
    ++refused_connections_;
    ++refused_keys_;
    const std::string key = Z85(frames[6].to_string());
    if (const int64_t n = Tally(key); PowerOfTwo(n)) {
      Write(absl::StrCat("refused a client key that is not in the allowlist: key=", key,
                         " peer_ip=", text(3), " refusals=", n));
    }
  } else {
    status = "200";
    reason = "OK";
    user_id = it->second;  // the instance the key belongs to: the message's User-Id
  }
  // RFC 27 reply: version, request id, status code, status text, user id, metadata.
  const std::string reply[] = {"1.0", text(1), status, reason, user_id, ""};
  for (size_t i = 0; i < std::size(reply); ++i) {
    zap_.send(zmq::buffer(reply[i]),
              i + 1 < std::size(reply) ? zmq::send_flags::sndmore : zmq::send_flags::none);
  }
}

void CurveAuthenticator::ReadMonitor() {
  while (true) {
    zmq::message_t event;
    if (!monitor_.recv(event, zmq::recv_flags::dontwait)) return;
    // The second frame (the endpoint) is always our bound address: skip it.
    for (bool more = event.more(); more;) {
      zmq::message_t rest;
      more = monitor_.recv(rest, zmq::recv_flags::dontwait) && rest.more();
    }
    if (event.size() < 6) continue;
    uint16_t id = 0;
    uint32_t value = 0;
    std::memcpy(&id, event.data(), sizeof(id));
    std::memcpy(&value, static_cast<const char*>(event.data()) + 2, sizeof(value));
    ++refused_connections_;
    const std::string why = HandshakeFailure(id, value);
    if (const int64_t n = Tally(why); PowerOfTwo(n)) {
      Write(absl::StrCat("refused a connection: ", why, ": refusals=", n));
    }
  }
}

int64_t CurveAuthenticator::Tally(const std::string& what) {
  auto it = refusals_.find(what);
  if (it == refusals_.end()) {
    // A peer that makes up a new key per attempt must not grow the map without
    // bound: past the bound, the rest share one count.
    if (refusals_.size() >= kMaxTrackedRefusals) return ++refusals_untracked_;
    it = refusals_.emplace(what, 0).first;
  }
  return ++it->second;
}

void CurveAuthenticator::Write(absl::string_view line) {
  const std::string full = absl::StrCat("kvx control channel ", address_, ": ", line);
  if (log_) {
    log_(full);
  } else {
    std::fprintf(stderr, "%s\n", full.c_str());
  }
}

}  // namespace kvx::transfer_internal
