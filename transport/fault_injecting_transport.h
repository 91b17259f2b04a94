// File: transport/fault_injecting_transport.h
//
// A Transport that wraps another and injects faults, for tests of anything that uses
// a Transport: fail the Nth write, delay completions, drop a peer mid-transfer.
// Every injected fault surfaces as an error whose message starts with
// "injected fault:"; nothing is corrupted silently (a failed write is not posted, so
// its target bytes stay as they were).
//
//   auto faulty = std::make_unique<kvx::transport::FaultInjectingTransport>(
//       *kvx::transport::CreateLoopbackTransport());
//   faulty->FailNthWrite(3);  // The 4th write posted from now on fails.
//
// Reporting keeps the Transport contract: an injected failure is reported (kFailed) at
// once, and the transfer reaches kQuiesced only once the wrapped transport has ended
// it (nothing of it is in flight any more).
//
// Thread safety: all methods are thread-safe.

#ifndef KVX_TRANSPORT_FAULT_INJECTING_TRANSPORT_H_
#define KVX_TRANSPORT_FAULT_INJECTING_TRANSPORT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "sync/mutex.h"
#include "transport/forwarding_transport.h"
#include "transport/transport.h"

namespace kvx::transport {

class FaultInjectingTransport final : public ForwardingTransport {
 public:
  // `clock` decides when delayed completions are due (tests pass a fake); it must be
  // thread-safe. REQUIRES: `inner` is not null.
  explicit FaultInjectingTransport(std::unique_ptr<Transport> inner,
                                   std::function<absl::Time()> clock = absl::Now);

  // The write with 0-based index `n`, counted over all writes posted from now on,
  // fails: it and the writes after it in its batch are not posted, and its transfer
  // fails with `Unavailable` naming the write (settled: what was posted was delivered).
  // One shot.
  void FailNthWrite(int64_t n);
  // Each transfer is reported done only `delay` (by `clock`) after the wrapped
  // transport finished it; if that passes its deadline it fails with
  // `DeadlineExceeded`. Zero turns delays off.
  void DelayCompletions(absl::Duration delay);
  // Every transfer to `peer` that is not final fails with `Unavailable` at once and
  // quiesces unsettled once the wrapped transport ended it (as a lost connection
  // would); new writes to it are refused with `Unavailable`.
  void DropPeer(PeerId peer);
  // DropPeer for every peer, present and future.
  void DropAllPeers();
  // Ends every fault set above (transfers already failed stay failed).
  void ClearFaults();

  absl::StatusOr<TransferId> PostWrites(PeerId peer, absl::Span<const WriteOp> writes,
                                        absl::Time deadline) override;
  absl::Status CancelTransfer(TransferId id) override;
  absl::StatusOr<TransferStatus> PollTransfer(TransferId id) override;
  absl::StatusOr<TransferStatus> WaitTransfer(TransferId id, absl::Time wait_deadline) override;

 private:
  struct Tracked {
    PeerId peer = 0;
    absl::Time deadline;
    std::optional<TransferId> inner;  // Absent when the first write failed.
    absl::Status injected;            // Our own failure, reported at once.
    bool settled_if_failed = true;    // False for a dropped peer.
    bool inner_final = false;
    TransferStatus inner_result;
    absl::Time inner_ended_at;
  };

  absl::StatusOr<TransferStatus> PollLocked(TransferId id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::function<absl::Time()> clock_;

  sync::Mutex mu_;
  sync::CondVar cv_;
  int64_t writes_seen_ ABSL_GUARDED_BY(mu_) = 0;
  std::optional<int64_t> fail_write_ ABSL_GUARDED_BY(mu_);
  absl::Duration delay_ ABSL_GUARDED_BY(mu_) = absl::ZeroDuration();
  absl::flat_hash_set<PeerId> dropped_ ABSL_GUARDED_BY(mu_);
  bool drop_all_ ABSL_GUARDED_BY(mu_) = false;
  TransferId next_id_ ABSL_GUARDED_BY(mu_) = 1;
  absl::flat_hash_map<TransferId, Tracked> transfers_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvx::transport

#endif  // KVX_TRANSPORT_FAULT_INJECTING_TRANSPORT_H_
