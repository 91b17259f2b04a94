// Do not include directly: detail of transfer/control_channel.h.
// IWYU pragma: private, include "transfer/control_channel.h"
//
// The server side of a control channel under CURVE: it makes the channel's ROUTER a
// CURVE server, answers ZeroMQ's authentication requests (ZAP, RFC 27) for it, and
// watches its failed handshakes. A client is accepted only when it proves a public
// key of the allowlist, and its messages then carry the instance name of that key
// as their "User-Id" property. Every refusal is counted and logged (the first of
// each key or reason, then at each power of two, so a peer that retries cannot
// flood the log).
//
// Why a thread of its own: libzmq asks the ZAP handler in the middle of a peer's
// handshake; answered on the channel's owner thread, a connection would wait for
// that thread's next Poll (which may be busy planning), and the handshake monitor,
// when its queue fills, blocks libzmq's I/O thread. This thread only waits on those
// two sockets and a stop signal.
//
// Thread safety: Create, Start and the destructor on the channel's owner thread;
// stats() from any thread; `log` is called on the internal thread.

#ifndef KVX_TRANSFER_INTERNAL_CURVE_AUTHENTICATOR_H_
#define KVX_TRANSFER_INTERNAL_CURVE_AUTHENTICATOR_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>  // NOLINT(build/c++11)

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "transfer/control_security.h"
#include "zmq.hpp"

namespace kvx::transfer_internal {

class CurveAuthenticator {
 public:
  using Log = std::function<void(absl::string_view line)>;
  struct Stats {
    int64_t refused_connections = 0;
    int64_t refused_keys = 0;
  };

  // Binds the ZAP endpoint of `context`, makes `router` a CURVE server with
  // `security.keys` and starts monitoring its handshakes. REQUIRES: security is
  // valid and kCurve; `router` has not bound yet (a connection accepted before the
  // handler is bound would skip it); one per context. `context` must outlive this.
  // Errors: Internal (a ZeroMQ failure, named).
  static absl::StatusOr<std::unique_ptr<CurveAuthenticator>> Create(
      zmq::context_t& context, zmq::socket_t& router, const transfer::ControlSecurity& security,
      Log log);

  // Starts answering, naming the channel by `address` in log lines. Until then a
  // peer's handshake waits. REQUIRES: called once.
  void Start(std::string address);

  // Stops the thread and closes its sockets. Close the ROUTER first: a handshake
  // that began after this would find no handler.
  ~CurveAuthenticator();
  CurveAuthenticator(const CurveAuthenticator&) = delete;
  CurveAuthenticator& operator=(const CurveAuthenticator&) = delete;

  Stats stats() const;

 private:
  CurveAuthenticator() = default;
  void Run();
  void AnswerZap();
  void ReadMonitor();
  // Counts one more refusal of a key, or event for a reason; returns how many so
  // far (a line is logged when it is a power of two).
  int64_t Tally(const std::string& what);
  void Write(absl::string_view line);

  // Constant after Start.
  Log log_;
  std::string address_;
  // instance -> its key is security.peers; this is the other way, by 32-byte key.
  absl::flat_hash_map<std::string, std::string> instance_by_key_;
  zmq::socket_t zap_;
  zmq::socket_t monitor_;
  int stop_fd_ = -1;
  std::thread thread_;

  // The internal thread only: events per key or reason, bounded.
  absl::flat_hash_map<std::string, int64_t> refusals_;
  int64_t refusals_untracked_ = 0;

  std::atomic<int64_t> refused_connections_{0};
  std::atomic<int64_t> refused_keys_{0};
};

}  // namespace kvx::transfer_internal

#endif  // KVX_TRANSFER_INTERNAL_CURVE_AUTHENTICATOR_H_
