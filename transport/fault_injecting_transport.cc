#include "transport/fault_injecting_transport.h"

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "sync/mutex.h"
#include "transport/transport.h"

namespace kvx::transport {

using sync::MutexLock;

FaultInjectingTransport::FaultInjectingTransport(std::unique_ptr<Transport> inner,
                                                 std::function<absl::Time()> clock)
    : ForwardingTransport(std::move(inner)), clock_(std::move(clock)) {}

void FaultInjectingTransport::FailNthWrite(int64_t n) {
  MutexLock lock(&mu_);
  fail_write_ = writes_seen_ + n;
}

void FaultInjectingTransport::DelayCompletions(absl::Duration delay) {
  MutexLock lock(&mu_);
  delay_ = delay;
}

void FaultInjectingTransport::DropAllPeers() {
  MutexLock lock(&mu_);
  drop_all_ = true;
  for (auto& [id, t] : transfers_) {
    if (!t.injected.ok()) continue;
    t.injected = absl::UnavailableError(absl::StrCat(
        "injected fault: peer dropped mid-transfer: peer=", t.peer, " transfer=", id));
    t.settled_if_failed = false;
  }
}

void FaultInjectingTransport::ClearFaults() {
  MutexLock lock(&mu_);
  fail_write_.reset();
  delay_ = absl::ZeroDuration();
  dropped_.clear();
  drop_all_ = false;
}

void FaultInjectingTransport::DropPeer(PeerId peer) {
  MutexLock lock(&mu_);
  dropped_.insert(peer);
  for (auto& [id, t] : transfers_) {
    if (t.peer != peer || !t.injected.ok()) continue;
    t.injected = absl::UnavailableError(absl::StrCat(
        "injected fault: peer dropped mid-transfer: peer=", peer, " transfer=", id));
    t.settled_if_failed = false;
  }
}

absl::StatusOr<TransferId> FaultInjectingTransport::PostWrites(
    PeerId peer, absl::Span<const WriteOp> writes, absl::Time deadline) {
  MutexLock lock(&mu_);
  if (drop_all_ || dropped_.contains(peer)) {
    return absl::UnavailableError(absl::StrCat("injected fault: peer dropped: peer=", peer));
  }
  Tracked tracked;
  tracked.peer = peer;
  tracked.deadline = deadline;
  size_t to_post = writes.size();
  if (fail_write_.has_value() && *fail_write_ >= writes_seen_ &&
      *fail_write_ < writes_seen_ + static_cast<int64_t>(writes.size())) {
    to_post = static_cast<size_t>(*fail_write_ - writes_seen_);
    tracked.injected = absl::UnavailableError(absl::StrCat(
        "injected fault: remote write failed: peer=", peer, " write=", to_post));
  }
  if (to_post > 0 || writes.empty()) {
    absl::StatusOr<TransferId> posted = inner().PostWrites(peer, writes.subspan(0, to_post), deadline);
    if (!posted.ok()) return posted.status();  // Nothing posted: the fault stays armed.
    tracked.inner = *posted;
  } else {
    tracked.inner_final = true;
    tracked.inner_result.state = TransferState::kDone;  // Nothing was posted.
    tracked.inner_ended_at = clock_();
  }
  if (!tracked.injected.ok()) fail_write_.reset();
  writes_seen_ += static_cast<int64_t>(writes.size());
  const TransferId id = next_id_++;
  transfers_[id] = std::move(tracked);
  return id;
}

absl::Status FaultInjectingTransport::CancelTransfer(TransferId id) {
  MutexLock lock(&mu_);
  auto it = transfers_.find(id);
  if (it == transfers_.end()) {
    return absl::NotFoundError(absl::StrCat("no such transfer: transfer=", id));
  }
  Tracked& t = it->second;
  if (t.inner_final || !t.injected.ok()) return absl::OkStatus();
  t.injected = absl::AbortedError(absl::StrCat("transfer cancelled: transfer=", id));
  return inner().CancelTransfer(*t.inner);
}

absl::StatusOr<TransferStatus> FaultInjectingTransport::PollLocked(TransferId id) {
  auto it = transfers_.find(id);
  if (it == transfers_.end()) {
    return absl::NotFoundError(absl::StrCat("no such transfer: transfer=", id));
  }
  Tracked& t = it->second;
  if (!t.inner_final) {
    absl::StatusOr<TransferStatus> polled = inner().PollTransfer(*t.inner);
    if (!polled.ok()) return polled.status();
    if (polled->final()) {
      t.inner_final = true;
      t.inner_result = *polled;
      t.inner_ended_at = clock_();
    } else if (t.injected.ok()) {
      return *polled;  // kInProgress, or the wrapped transport's own kFailed.
    }
  }
  TransferStatus result;
  if (!t.injected.ok()) {
    result.error = t.injected;
    result.state = t.inner_final ? TransferState::kQuiesced : TransferState::kFailed;
    result.target_settled = t.inner_final && t.settled_if_failed &&
                            (t.inner_result.state == TransferState::kDone ||
                             t.inner_result.target_settled);
  } else if (t.inner_result.state != TransferState::kDone) {
    result = t.inner_result;
  } else if (delay_ > absl::ZeroDuration()) {
    const absl::Time now = clock_();
    const absl::Time due = t.inner_ended_at + delay_;
    if (due > t.deadline && now >= t.deadline) {
      // The bytes are there (the wrapped transfer is done), but too late.
      result.state = TransferState::kQuiesced;
      result.error = absl::DeadlineExceededError(absl::StrCat(
          "injected fault: completion delayed past the deadline: transfer=", id,
          " delay=", absl::FormatDuration(delay_)));
      result.target_settled = true;
    } else if (now < due) {
      return TransferStatus{};  // Still "in progress".
    } else {
      result.state = TransferState::kDone;
    }
  } else {
    result.state = TransferState::kDone;
  }
  if (result.final()) transfers_.erase(it);
  return result;
}

absl::StatusOr<TransferStatus> FaultInjectingTransport::PollTransfer(TransferId id) {
  MutexLock lock(&mu_);
  return PollLocked(id);
}

absl::StatusOr<TransferStatus> FaultInjectingTransport::WaitTransfer(TransferId id,
                                                                     absl::Time wait_deadline) {
  MutexLock lock(&mu_);
  for (;;) {
    absl::StatusOr<TransferStatus> state = PollLocked(id);
    if (!state.ok() || state->final()) return state;
    // The wrapped transport and the injected clock cannot signal us: re-check every
    // millisecond (this is a test utility, not a hot path).
    if (absl::Now() >= wait_deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("wait deadline passed before the transfer ended: transfer=", id));
    }
    cv_.WaitUntil(&lock, std::min(wait_deadline, absl::Now() + absl::Milliseconds(1)));
  }
}

}  // namespace kvx::transport
