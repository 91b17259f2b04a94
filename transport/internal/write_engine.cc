#include "transport/internal/write_engine.h"

#include <sched.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <thread>  // NOLINT(build/c++11)
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "transport/internal/mutex.h"
#include "transport/transport.h"

namespace kvx::transport_internal {

using transport::LocalRegion;
using transport::MemoryKind;
using transport::PeerId;
using transport::TransferId;
using transport::TransferState;
using transport::WriteOp;

namespace {

// True if [offset, offset + length) fits in [0, size), without overflow.
bool RangeFits(uint64_t offset, uint64_t length, uint64_t size) {
  return offset <= size && length <= size - offset;
}

}  // namespace

WriteEngine::WriteEngine(const EngineOptions& options) : options_(options) {}

WriteEngine::~WriteEngine() {
  // The derived destructor stopped the thread (it must, before its hooks die); this
  // only covers a derived constructor that failed before StartOwnerThread.
  StopOwnerThread();
}

void WriteEngine::StartOwnerThread() {
  const int64_t window = std::max<int64_t>(1, options_.window);
  slots_.resize(window);
  free_slots_.reserve(window);
  for (Slot& slot : slots_) free_slots_.push_back(&slot);
  owner_ = std::thread([this] { OwnerLoop(); });
}

void WriteEngine::StopOwnerThread() {
  {
    MutexLock lock(&mu_);
    stop_ = true;
  }
  work_cv_.SignalAll();
  if (owner_.joinable()) owner_.join();
  MutexLock lock(&mu_);
  // Nobody will progress these any more; fail them so no waiter hangs.
  for (auto& [id, result] : transfers_) {
    if (!result.has_value()) {
      result = absl::AbortedError(absl::StrCat("transport shut down: transfer=", id));
    }
  }
  done_cv_.SignalAll();
}

absl::StatusOr<LocalRegion> WriteEngine::RegisterMemory(void* base, uint64_t length,
                                                        MemoryKind kind) {
  if (base == nullptr || length == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot register an empty region: base=", absl::Hex(base), " length=", length));
  }
  absl::StatusOr<BackendRegion> backend = RegisterWithBackend(base, length, kind);
  if (!backend.ok()) return backend.status();
  MutexLock lock(&mu_);
  const int64_t id = next_id_++;
  Region& region = regions_[id];
  region.base = static_cast<char*>(base);
  region.length = length;
  region.backend = *backend;
  return LocalRegion{id, backend->descriptor};
}

absl::Status WriteEngine::DeregisterMemory(int64_t region_id) {
  BackendRegion backend;
  {
    MutexLock lock(&mu_);
    auto it = regions_.find(region_id);
    if (it == regions_.end()) {
      return absl::NotFoundError(absl::StrCat("no such region: region=", region_id));
    }
    if (it->second.busy_pieces > 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("region has writes queued or in flight: region=", region_id,
                       " pieces=", it->second.busy_pieces));
    }
    backend = it->second.backend;
    // Erased first, so no new write can name it while the backend releases it.
    regions_.erase(it);
  }
  DeregisterWithBackend(backend);
  return absl::OkStatus();
}

absl::StatusOr<PeerId> WriteEngine::AddPeer(absl::string_view address) {
  absl::StatusOr<BackendPeer> peer = ResolvePeer(address);
  if (!peer.ok()) return peer.status();
  MutexLock lock(&mu_);
  const PeerId id = next_id_++;
  peers_[id] = *std::move(peer);
  return id;
}

absl::StatusOr<TransferId> WriteEngine::PostWrites(PeerId peer_id,
                                                   absl::Span<const WriteOp> writes,
                                                   absl::Time deadline) {
  if (writes.empty()) return absl::InvalidArgumentError("empty write batch");
  const uint64_t max_piece = std::max<uint64_t>(1, options_.max_write_bytes);
  NewTransfer transfer;
  transfer.deadline = deadline;
  uint64_t peer_handle = 0;
  // Region of each write, resolved under the lock; stable afterwards because the
  // busy counts taken below keep the regions registered.
  std::vector<Region*> region_of(writes.size());
  size_t num_pieces = 0;
  {
    MutexLock lock(&mu_);
    if (stop_) return absl::FailedPreconditionError("transport is shutting down");
    auto peer = peers_.find(peer_id);
    if (peer == peers_.end()) {
      return absl::NotFoundError(absl::StrCat("no such peer: peer=", peer_id));
    }
    // Validate everything before taking anything, so an error queues nothing.
    int64_t cached_id = 0;
    Region* cached = nullptr;  // Consecutive writes mostly share a region.
    for (size_t i = 0; i < writes.size(); ++i) {
      const WriteOp& w = writes[i];
      if (cached == nullptr || cached_id != w.local_region) {
        auto region = regions_.find(w.local_region);
        if (region == regions_.end()) {
          return absl::NotFoundError(absl::StrCat("no such local region: write=", i,
                                                  " region=", w.local_region));
        }
        cached_id = w.local_region;
        cached = &region->second;
      }
      if (w.length == 0) {
        return absl::InvalidArgumentError(absl::StrCat("zero-length write: write=", i));
      }
      if (!RangeFits(w.local_offset, w.length, cached->length)) {
        return absl::OutOfRangeError(absl::StrCat(
            "write past the end of its local region: write=", i, " region=",
            w.local_region, " offset=", w.local_offset, " length=", w.length,
            " region_length=", cached->length));
      }
      if (!RangeFits(w.remote_offset, w.length, w.remote.length)) {
        return absl::OutOfRangeError(absl::StrCat(
            "write past the end of its remote region: write=", i, " peer=",
            peer->second.name, " offset=", w.remote_offset, " length=", w.length,
            " region_length=", w.remote.length, " key=", w.remote.key));
      }
      region_of[i] = cached;
      num_pieces += static_cast<size_t>((w.length - 1) / max_piece + 1);
    }
    // Take: every piece keeps its region registered until it finishes.
    for (size_t i = 0; i < writes.size(); ++i) {
      region_of[i]->busy_pieces +=
          static_cast<int64_t>((writes[i].length - 1) / max_piece + 1);
    }
    transfer.id = next_id_++;
    transfer.peer_name = peer->second.name;
    peer_handle = peer->second.handle;
    transfers_[transfer.id] = std::nullopt;
  }
  // Split outside the lock: callers and the owner thread are not held up by it.
  transfer.pieces.reserve(num_pieces);
  for (size_t i = 0; i < writes.size(); ++i) {
    const WriteOp& w = writes[i];
    const Region& region = *region_of[i];
    for (uint64_t done = 0; done < w.length; done += max_piece) {
      Piece& piece = transfer.pieces.emplace_back();
      piece.transfer = transfer.id;
      piece.write_index = static_cast<int64_t>(i);
      piece.region_id = w.local_region;
      piece.write.local = region.base + w.local_offset + done;
      piece.write.local_desc = region.backend.desc;
      piece.write.peer = peer_handle;
      piece.write.remote_address = w.remote.address + w.remote_offset + done;
      piece.write.remote_key = w.remote.key;
      piece.write.length = std::min(max_piece, w.length - done);
    }
  }
  transfer.pieces.back().last = true;
  transfer.pieces.back().write.deliver_complete = true;
  const TransferId id = transfer.id;
  {
    MutexLock lock(&mu_);
    submitted_.push_back(std::move(transfer));
  }
  work_cv_.SignalAll();
  return id;
}

absl::StatusOr<TransferState> WriteEngine::PollTransfer(TransferId id) {
  MutexLock lock(&mu_);
  auto it = transfers_.find(id);
  if (it == transfers_.end()) {
    return absl::NotFoundError(absl::StrCat("no such transfer: transfer=", id));
  }
  if (!it->second.has_value()) return TransferState::kInProgress;
  absl::Status status = *std::move(it->second);
  transfers_.erase(it);
  if (!status.ok()) return status;
  return TransferState::kDone;
}

absl::Status WriteEngine::WaitTransfer(TransferId id, absl::Time wait_deadline) {
  MutexLock lock(&mu_);
  for (;;) {
    auto it = transfers_.find(id);
    if (it == transfers_.end()) {
      return absl::NotFoundError(absl::StrCat("no such transfer: transfer=", id));
    }
    if (it->second.has_value()) {
      absl::Status status = *std::move(it->second);
      transfers_.erase(it);
      return status;
    }
    if (done_cv_.WaitUntil(&lock, wait_deadline)) {
      auto again = transfers_.find(id);
      if (again != transfers_.end() && again->second.has_value()) continue;
      return absl::DeadlineExceededError(
          absl::StrCat("wait deadline passed before the transfer ended: transfer=", id));
    }
  }
}

void WriteEngine::OwnerLoop() {
  std::vector<NewTransfer> incoming;
  for (;;) {
    {
      MutexLock lock(&mu_);
      if (stop_) break;
      if (submitted_.empty() && progress_.empty() && options_.idle_poll_interval > absl::ZeroDuration()) {
        work_cv_.WaitUntil(&lock, absl::Now() + options_.idle_poll_interval);
        if (stop_) break;
      }
      incoming.swap(submitted_);
    }
    bool busy = !incoming.empty();
    for (NewTransfer& t : incoming) {
      Progress& p = progress_[t.id];
      p.deadline = t.deadline;
      p.peer_name = std::move(t.peer_name);
      p.total = static_cast<int64_t>(t.pieces.size());
      p.queued = p.total;
      t.progress = &p;
      pending_.push_back(std::move(t));
    }
    incoming.clear();

    completions_.clear();
    PollBackend(&completions_);
    TransferId cached_id = 0;
    Progress* cached = nullptr;  // Consecutive completions mostly share a transfer.
    for (Completion& c : completions_) {
      busy = true;
      Slot* slot = static_cast<Slot*>(c.context);
      if (cached == nullptr || cached_id != slot->transfer) {
        cached_id = slot->transfer;
        cached = &progress_[cached_id];
      }
      Progress& p = *cached;
      --p.in_flight;
      if (c.status.ok()) {
        ++p.done;
      } else if (p.error.ok()) {
        p.error = absl::Status(
            c.status.code(), absl::StrCat("remote write failed: peer=", p.peer_name,
                                          " transfer=", slot->transfer, " write=",
                                          slot->write_index, ": ", c.status.message()));
      }
      FinishPiece(slot->region_id);
      free_slots_.push_back(slot);
    }
    busy |= PostPending();

    const absl::Time now = absl::Now();
    for (auto it = progress_.begin(); it != progress_.end();) {
      Progress& p = it->second;
      if (!p.published) {
        if (p.done == p.total) {
          Publish(it->first, absl::OkStatus());
          p.published = true;
        } else if (!p.error.ok() && p.in_flight == 0) {
          Publish(it->first, p.error);
          p.published = true;
        } else if (now >= p.deadline) {
          p.error = absl::DeadlineExceededError(absl::StrCat(
              "transfer deadline passed: peer=", p.peer_name, " transfer=", it->first,
              " pieces_done=", p.done, " pieces_total=", p.total,
              " pieces_in_flight=", p.in_flight));
          Publish(it->first, p.error);
          p.published = true;
        }
      }
      if (p.published && p.in_flight == 0 && p.queued == 0) {
        progress_.erase(it++);
      } else {
        ++it;
      }
    }

    if (!results_.empty() || !finished_regions_.empty()) {
      MutexLock lock(&mu_);
      for (const auto& [region_id, pieces] : finished_regions_) {
        auto region = regions_.find(region_id);
        if (region != regions_.end()) region->second.busy_pieces -= pieces;
      }
      for (auto& [id, status] : results_) {
        auto it = transfers_.find(id);
        if (it != transfers_.end()) it->second = std::move(status);
      }
      finished_regions_.clear();
      if (!results_.empty()) done_cv_.SignalAll();
      results_.clear();
    }
    if (!busy) sched_yield();
  }
}

bool WriteEngine::PostPending() {
  bool busy = false;
  while (!pending_.empty() && !free_slots_.empty()) {
    NewTransfer& batch = pending_.front();
    if (batch.next == batch.pieces.size()) {
      pending_.pop_front();
      continue;
    }
    const Piece& piece = batch.pieces[batch.next];
    Progress& p = *batch.progress;  // Not erased while it has queued pieces.
    if (!p.error.ok()) {
      // The transfer failed or expired: drop what it has not posted yet.
      for (; batch.next < batch.pieces.size(); ++batch.next) {
        --p.queued;
        FinishPiece(batch.pieces[batch.next].region_id);
      }
      busy = true;
      continue;
    }
    // Invariant 4: the last piece waits for the others (a fence).
    if (piece.last && p.done != p.total - 1) break;
    Slot* slot = free_slots_.back();
    slot->transfer = piece.transfer;
    slot->write_index = piece.write_index;
    slot->region_id = piece.region_id;
    absl::StatusOr<PostResult> result = PostToBackend(piece.write, slot);
    if (result.ok() && *result == PostResult::kQueueFull) break;  // Progress, retry.
    busy = true;
    --p.queued;
    if (result.ok()) {
      free_slots_.pop_back();
      ++p.in_flight;
    } else {
      p.error = absl::Status(
          result.status().code(),
          absl::StrCat("posting a remote write failed: peer=", p.peer_name, " transfer=",
                       piece.transfer, " write=", piece.write_index, ": ",
                       result.status().message()));
      FinishPiece(piece.region_id);
    }
    ++batch.next;
  }
  return busy;
}

void WriteEngine::FinishPiece(int64_t region_id) {
  if (!finished_regions_.empty() && finished_regions_.back().first == region_id) {
    ++finished_regions_.back().second;
  } else {
    finished_regions_.emplace_back(region_id, 1);
  }
}

void WriteEngine::Publish(TransferId id, absl::Status status) {
  // A deep copy: absl::Status shares its message by a reference count kept inside
  // the uninstrumented Abseil library, which ThreadSanitizer cannot see, so a shared
  // rep freed here after the caller read it is reported as a race.
  results_.emplace_back(id, status.ok() ? absl::OkStatus()
                                        : absl::Status(status.code(), std::string(status.message())));
}

}  // namespace kvx::transport_internal
