#include "transport/internal/write_engine.h"

#include <sched.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <thread>  // NOLINT(build/c++11)
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "transport/internal/mutex.h"
#include "transport/transport.h"

namespace kvx::transport_internal {

using transport::MemoryKind;
using transport::PeerId;
using transport::RegionDescriptor;
using transport::RegionId;
using transport::TransferId;
using transport::TransferState;
using transport::TransferStatus;
using transport::WriteOp;

namespace {

// True if [offset, offset + length) fits in [0, size), without overflow.
bool RangeFits(uint64_t offset, uint64_t length, uint64_t size) {
  return offset <= size && length <= size - offset;
}

// How long the owner thread keeps spinning after the last event before it sleeps
// between polls: completions of a busy transfer arrive within microseconds.
constexpr absl::Duration kSpinBeforeSleep = absl::Microseconds(200);

// A deep copy: absl::Status shares its message by a reference count kept inside the
// uninstrumented Abseil library, which ThreadSanitizer cannot see, so a shared rep
// freed on one thread after another read it is reported as a race.
absl::Status DeepCopy(const absl::Status& status) {
  return status.ok() ? absl::OkStatus()
                     : absl::Status(status.code(), std::string(status.message()));
}

TransferStatus DeepCopy(const TransferStatus& status) {
  TransferStatus copy = status;
  copy.error = DeepCopy(status.error);
  return copy;
}

}  // namespace

// One write of a transfer, resolved for posting.
struct ResolvedWrite {
  const char* local = nullptr;
  void* local_desc = nullptr;
  uint64_t remote_address = 0;
  uint64_t remote_key = 0;
  uint64_t length = 0;
};

// Owner-thread state of one transfer. Pieces are cut from `writes` lazily, so a
// transfer costs one ResolvedWrite per write however it is split.
struct WriteEngine::Transfer {
  TransferId id = 0;
  PeerId peer = 0;
  BackendPeer backend_peer;  // As resolved at PostWrites; the run's handle wins.
  PeerRun* run = nullptr;
  absl::Time deadline;
  std::vector<ResolvedWrite> writes;
  absl::InlinedVector<RegionId, 1> regions;  // Distinct local regions it reads.
  size_t next_write = 0;
  uint64_t next_offset = 0;
  int64_t pieces_total = 0;
  int64_t pieces_posted = 0;
  int64_t pieces_done = 0;
  int64_t in_flight = 0;  // Pieces and the flush.

  bool queued = false;   // In run->queue.
  bool parked = false;   // Its last piece waits for the others (invariant 4).
  bool touched = false;  // In touched_ this round.
  bool finished = false; // Its final outcome was produced.

  bool failed = false;
  absl::Status error;
  absl::Time failed_at;
  bool piece_error = false;  // A piece completed with an error: delivery unknown.
  bool reset = false;        // Abandoned by a reset or a removed peer.
  // Its connection broke under it: the target closed it (its fence, or it died), so
  // nothing sent on it can land any more, and nothing of it was sent on another.
  bool connection_died = false;
  enum class Flush { kNone, kWanted, kInFlight, kOk, kFailed } flush = Flush::kNone;

  bool fully_posted() const { return next_write == writes.size(); }
};

// Owner-thread state of one peer: its own queue and window (semantics 7).
struct WriteEngine::PeerRun {
  PeerId id = 0;
  BackendPeer backend;
  std::deque<Transfer*> queue;      // Transfers with pieces left to post, oldest first.
  std::deque<Transfer*> flushes;    // Failed transfers waiting to post their flush.
  absl::flat_hash_set<Transfer*> active;  // Every non-final transfer to this peer.
  int64_t in_flight = 0;            // Pieces (and flushes) in flight, zombies excluded.
  bool ready = false;               // In ready_.
  bool accepted_any = false;  // It took a piece since its last failed one.
  bool removed = false;
};

// The context handed to the backend; the scratch must stay the first member.
struct WriteEngine::Slot {
  alignas(16) unsigned char backend_context[kBackendContextBytes];
  Transfer* transfer = nullptr;  // Null for a zombie (invariant 6).
  PeerRun* run = nullptr;
  size_t write_index = 0;        // For error messages.
  bool flush = false;
  bool in_use = false;
};

struct WriteEngine::Command {
  enum class Kind { kCancel, kRemovePeer } kind = Kind::kCancel;
  TransferId transfer = 0;
  PeerId peer = 0;
  BackendPeer backend_peer;
  std::vector<BackendGrant> grants;  // To revoke, for kRemovePeer.
  int64_t seq = 0;
};

WriteEngine::WriteEngine(const EngineOptions& options) : options_(options) {}

WriteEngine::~WriteEngine() {
  // The derived destructor stopped the thread (it must, before its hooks die); this
  // only covers a derived constructor that failed before StartOwnerThread.
  StopOwnerThread();
}

void WriteEngine::StartOwnerThread() {
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
  // Nobody will progress these any more; the backend closes its endpoint next, which
  // ends whatever is in flight. Fail them so no waiter hangs.
  for (auto& [id, record] : records_) {
    if (record.status.final()) continue;
    if (record.status.error.ok()) {
      record.status.error = absl::AbortedError(absl::StrCat("transport shut down: transfer=", id));
    }
    record.status.state = TransferState::kQuiesced;
    record.status.target_settled = false;
  }
  commands_done_ = commands_issued_;
  done_cv_.SignalAll();
}

void WriteEngine::PauseForTest(bool paused) {
  {
    MutexLock lock(&mu_);
    paused_ = paused;
  }
  work_cv_.SignalAll();
}

absl::StatusOr<RegionId> WriteEngine::RegisterMemory(void* base, uint64_t length,
                                                     MemoryKind kind) {
  if (base == nullptr || length == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot register an empty region: base=", absl::Hex(base), " length=", length));
  }
  absl::StatusOr<BackendRegion> backend = RegisterWithBackend(base, length, kind);
  if (!backend.ok()) return backend.status();
  MutexLock lock(&mu_);
  const RegionId id = next_id_++;
  Region& region = regions_[id];
  region.base = static_cast<char*>(base);
  region.length = length;
  region.backend = *backend;
  return id;
}

absl::Status WriteEngine::DeregisterMemory(RegionId region_id) {
  BackendRegion backend;
  {
    MutexLock lock(&mu_);
    auto it = regions_.find(region_id);
    if (it == regions_.end()) {
      return absl::NotFoundError(absl::StrCat("no such region: region=", region_id));
    }
    const Region& region = it->second;
    if (region.busy_transfers > 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("region is read by transfers that are not final: region=", region_id,
                       " transfers=", region.busy_transfers));
    }
    if (!region.grants.empty() || region.pending_grants > 0) {
      std::vector<PeerId> holders;
      for (const auto& [peer, grant] : region.grants) holders.push_back(peer);
      std::sort(holders.begin(), holders.end());
      return absl::FailedPreconditionError(absl::StrCat(
          "region is writable by peers; remove them first (RemovePeer fences them): region=",
          region_id, " peers=[", absl::StrJoin(holders, ","), "] pending_grants=",
          region.pending_grants));
    }
    backend = region.backend;
    // Erased first, so no new write can name it while the backend releases it.
    regions_.erase(it);
  }
  DeregisterWithBackend(backend);
  return absl::OkStatus();
}

absl::StatusOr<PeerId> WriteEngine::AddPeer(absl::string_view address) {
  // Serialized, so one address never becomes two peers, and a re-added address waits
  // for the fence of its previous id.
  MutexLock add_lock(&add_peer_mu_);
  {
    MutexLock lock(&mu_);
    auto known = peer_by_address_.find(address);
    if (known != peer_by_address_.end()) return known->second;
    if (static_cast<int64_t>(peers_.size()) >= options_.max_peers) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "too many peers: peers=", peers_.size(), " max_peers=", options_.max_peers));
    }
  }
  absl::StatusOr<BackendPeer> backend = ResolvePeer(address);
  if (!backend.ok()) return backend.status();
  MutexLock lock(&mu_);
  const PeerId id = next_id_++;
  peers_[id] = Peer{*std::move(backend), std::string(address)};
  peer_by_address_[std::string(address)] = id;
  return id;
}

absl::Status WriteEngine::RemovePeer(PeerId peer_id) {
  MutexLock add_lock(&add_peer_mu_);
  int64_t seq = 0;
  {
    MutexLock lock(&mu_);
    auto peer = peers_.find(peer_id);
    if (peer == peers_.end()) {
      return absl::NotFoundError(absl::StrCat("no such peer: peer=", peer_id));
    }
    Command command;
    command.kind = Command::Kind::kRemovePeer;
    command.peer = peer_id;
    command.backend_peer = peer->second.backend;
    for (auto& [region_id, region] : regions_) {
      auto grant = region.grants.find(peer_id);
      if (grant == region.grants.end()) continue;
      command.grants.push_back(grant->second);
      region.grants.erase(grant);
    }
    peer_by_address_.erase(peer->second.address);
    peers_.erase(peer);
    // Semantics 2: reported at once. The owner thread drops and quiesces them.
    for (auto& [id, record] : records_) {
      if (record.peer != peer_id || record.status.state != TransferState::kInProgress) continue;
      record.status.state = TransferState::kFailed;
      record.status.error = absl::AbortedError(
          absl::StrCat("peer removed: peer=", peer_id, " transfer=", id));
    }
    seq = ++commands_issued_;
    command.seq = seq;
    commands_.push_back(std::move(command));
    done_cv_.SignalAll();
  }
  work_cv_.SignalAll();
  const absl::Time give_up = absl::Now() + options_.fence_timeout;
  MutexLock lock(&mu_);
  while (commands_done_ < seq) {
    if (done_cv_.WaitUntil(&lock, give_up) && commands_done_ < seq) {
      return absl::DeadlineExceededError(absl::StrCat(
          "the owner thread did not confirm the fence in time: peer=", peer_id,
          " fence_timeout=", absl::FormatDuration(options_.fence_timeout)));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<RegionDescriptor> WriteEngine::GrantRemoteWrite(RegionId region_id,
                                                               PeerId peer_id) {
  BackendRegion region_backend;
  BackendPeer peer_backend;
  char* base = nullptr;
  uint64_t length = 0;
  {
    MutexLock lock(&mu_);
    auto region = regions_.find(region_id);
    if (region == regions_.end()) {
      return absl::NotFoundError(absl::StrCat("no such region: region=", region_id));
    }
    auto peer = peers_.find(peer_id);
    if (peer == peers_.end()) {
      return absl::NotFoundError(absl::StrCat("no such peer: peer=", peer_id));
    }
    auto existing = region->second.grants.find(peer_id);
    if (existing != region->second.grants.end()) return existing->second.descriptor;
    ++region->second.pending_grants;  // Keeps the region registered meanwhile.
    region_backend = region->second.backend;
    base = region->second.base;
    length = region->second.length;
    peer_backend = peer->second.backend;
  }
  absl::StatusOr<BackendGrant> grant =
      GrantWithBackend(region_backend, base, length, peer_backend);
  std::optional<BackendGrant> undo;
  absl::StatusOr<RegionDescriptor> result;
  {
    MutexLock lock(&mu_);
    Region& region = regions_[region_id];
    --region.pending_grants;
    if (!grant.ok()) return grant.status();
    if (!peers_.contains(peer_id)) {
      undo = *grant;
      result = absl::NotFoundError(
          absl::StrCat("peer removed while granting: peer=", peer_id, " region=", region_id));
    } else if (auto existing = region.grants.find(peer_id); existing != region.grants.end()) {
      undo = *grant;  // A concurrent call won; its descriptor stands.
      result = existing->second.descriptor;
    } else {
      region.grants[peer_id] = *grant;
      result = grant->descriptor;
    }
  }
  // Never given out, so revoking it here cannot race with a write through it.
  if (undo.has_value()) RevokeWithBackend(*undo);
  return result;
}

absl::StatusOr<TransferId> WriteEngine::PostWrites(PeerId peer_id,
                                                   absl::Span<const WriteOp> writes,
                                                   absl::Time deadline) {
  if (writes.empty()) return absl::InvalidArgumentError("empty write batch");
  const uint64_t max_piece = std::max<uint64_t>(1, options_.max_write_bytes);
  auto transfer = std::make_unique<Transfer>();
  transfer->deadline = deadline;
  transfer->peer = peer_id;
  transfer->writes.resize(writes.size());
  TransferId id = 0;
  {
    MutexLock lock(&mu_);
    if (stop_) return absl::FailedPreconditionError("transport is shutting down");
    auto peer = peers_.find(peer_id);
    if (peer == peers_.end()) {
      return absl::NotFoundError(absl::StrCat("no such peer: peer=", peer_id));
    }
    if (static_cast<int64_t>(records_.size()) >= options_.max_transfers) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "too many transfers tracked (poll or wait for finished ones): transfers=",
          records_.size(), " max_transfers=", options_.max_transfers));
    }
    if (queued_writes_ + static_cast<int64_t>(writes.size()) > options_.max_queued_writes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "too many writes queued: queued=", queued_writes_, " batch=", writes.size(),
          " max_queued_writes=", options_.max_queued_writes));
    }
    // Validate and resolve everything before taking anything, so an error queues
    // nothing.
    RegionId cached_id = 0;
    const Region* cached = nullptr;  // Consecutive writes mostly share a region.
    int64_t pieces = 0;
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
        if (std::find(transfer->regions.begin(), transfer->regions.end(), cached_id) ==
            transfer->regions.end()) {
          transfer->regions.push_back(cached_id);
        }
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
            peer->second.backend.name, " offset=", w.remote_offset, " length=", w.length,
            " region_length=", w.remote.length));
      }
      ResolvedWrite& r = transfer->writes[i];
      r.local = cached->base + w.local_offset;
      r.local_desc = cached->backend.desc;
      r.remote_address = w.remote.address + w.remote_offset;
      r.remote_key = w.remote.key;
      r.length = w.length;
      pieces += static_cast<int64_t>((w.length - 1) / max_piece + 1);
    }
    for (RegionId region : transfer->regions) ++regions_[region].busy_transfers;
    id = next_id_++;
    transfer->id = id;
    transfer->pieces_total = pieces;
    transfer->backend_peer = peer->second.backend;
    queued_writes_ += static_cast<int64_t>(writes.size());
    Record& record = records_[id];
    record.peer = peer_id;
    record.writes = static_cast<int64_t>(writes.size());
    submitted_.push_back(std::move(transfer));
  }
  work_cv_.SignalAll();
  return id;
}

absl::Status WriteEngine::CancelTransfer(TransferId id) {
  {
    MutexLock lock(&mu_);
    auto it = records_.find(id);
    if (it == records_.end()) {
      return absl::NotFoundError(absl::StrCat("no such transfer: transfer=", id));
    }
    if (it->second.status.state != TransferState::kInProgress) return absl::OkStatus();
    it->second.status.state = TransferState::kFailed;
    it->second.status.error =
        absl::AbortedError(absl::StrCat("transfer cancelled: transfer=", id));
    Command command;
    command.kind = Command::Kind::kCancel;
    command.transfer = id;
    commands_.push_back(std::move(command));
    done_cv_.SignalAll();
  }
  work_cv_.SignalAll();
  return absl::OkStatus();
}

absl::StatusOr<TransferStatus> WriteEngine::PollTransfer(TransferId id) {
  MutexLock lock(&mu_);
  auto it = records_.find(id);
  if (it == records_.end()) {
    return absl::NotFoundError(absl::StrCat("no such transfer: transfer=", id));
  }
  TransferStatus status = DeepCopy(it->second.status);
  if (status.final()) records_.erase(it);
  return status;
}

absl::StatusOr<TransferStatus> WriteEngine::WaitTransfer(TransferId id,
                                                         absl::Time wait_deadline) {
  MutexLock lock(&mu_);
  for (;;) {
    auto it = records_.find(id);
    if (it == records_.end()) {
      return absl::NotFoundError(absl::StrCat("no such transfer: transfer=", id));
    }
    if (it->second.status.final()) {
      TransferStatus status = DeepCopy(it->second.status);
      records_.erase(it);
      return status;
    }
    if (done_cv_.WaitUntil(&lock, wait_deadline)) {
      auto again = records_.find(id);
      if (again != records_.end() && again->second.status.final()) continue;
      return absl::DeadlineExceededError(
          absl::StrCat("wait deadline passed before the transfer ended: transfer=", id));
    }
  }
}

// ---------------------------------------------------------------------------------
// The owner thread.

void WriteEngine::OwnerLoop() {
  std::vector<std::unique_ptr<Transfer>> incoming;
  std::vector<Command> commands;
  absl::Time last_event = absl::Now();
  for (;;) {
    {
      MutexLock lock(&mu_);
      const absl::Time now = absl::Now();
      const bool quiet = now - last_event > kSpinBeforeSleep;
      if (!stop_ && (paused_ || (quiet && submitted_.empty() && commands_.empty() &&
                                 options_.idle_poll_interval > absl::ZeroDuration()))) {
        absl::Time wake = now + options_.idle_poll_interval;
        if (!timers_.empty()) wake = std::min(wake, timers_.top().first);
        if (paused_) wake = absl::InfiniteFuture();
        work_cv_.WaitUntil(&lock, wake);
      }
      if (stop_) break;
      if (paused_) continue;
      incoming.swap(submitted_);
      commands.swap(commands_);
    }
    bool busy = !incoming.empty() || !commands.empty();
    TakeSubmissions(&incoming, &commands);

    completions_.clear();
    PollBackend(&completions_);
    busy |= !completions_.empty();
    HandleCompletions();
    busy |= PostReady();
    FireTimers(absl::Now());
    for (Transfer* t : touched_) {
      t->touched = false;
      Settle(*t);
    }
    touched_.clear();
    busy |= !outcomes_.empty();
    Publish();
    if (busy) {
      last_event = absl::Now();
    } else {
      sched_yield();
    }
  }
}

void WriteEngine::TakeSubmissions(std::vector<std::unique_ptr<Transfer>>* incoming,
                                  std::vector<Command>* commands) {
  for (std::unique_ptr<Transfer>& owned : *incoming) {
    Transfer* t = owned.get();
    PeerRun& run = runs_[t->peer];
    if (run.id == 0) {
      run.id = t->peer;
      run.backend = t->backend_peer;
    }
    t->run = &run;
    run.active.insert(t);
    timers_.emplace(t->deadline, t->id);
    transfers_[t->id] = std::move(owned);
    t->queued = true;
    run.queue.push_back(t);
    if (!run.ready) {
      run.ready = true;
      ready_.push_back(&run);
    }
  }
  incoming->clear();
  for (const Command& command : *commands) RunCommand(command);
  commands->clear();
}

void WriteEngine::RunCommand(const Command& command) {
  if (command.kind == Command::Kind::kCancel) {
    auto it = transfers_.find(command.transfer);
    if (it != transfers_.end() && !it->second->finished) {
      Fail(*it->second, absl::AbortedError(
                            absl::StrCat("transfer cancelled: transfer=", command.transfer)));
    }
    return;
  }
  // kRemovePeer, the fence: first no new write of the peer's is accepted (its grants
  // are revoked), then what is arriving is cut off (its connection is torn down).
  // Both run here, between two progress calls, so no piece of the provider's
  // receive path is half-way through a write of the peer's.
  for (const BackendGrant& grant : command.grants) RevokeWithBackend(grant);
  auto run = runs_.find(command.peer);
  // A reset may have given the run a newer handle than the caller's table holds.
  ForgetPeer(run != runs_.end() ? run->second.backend : command.backend_peer);
  if (run != runs_.end()) {
    run->second.removed = true;
    for (Transfer* t : run->second.active) {
      if (!t->failed) {
        Fail(*t, absl::AbortedError(
                     absl::StrCat("peer removed: peer=", command.peer, " transfer=", t->id)));
      }
    }
    Abandon(run->second);
    if (run->second.active.empty()) {
      if (run->second.ready) ready_.erase(std::find(ready_.begin(), ready_.end(), &run->second));
      runs_.erase(run);
    }
  }
  MutexLock lock(&mu_);
  commands_done_ = std::max(commands_done_, command.seq);
  done_cv_.SignalAll();
}

absl::StatusOr<WriteEngine::PostResult> WriteEngine::Post(PeerRun& run, Transfer& t,
                                                          const PostedWrite& write,
                                                          bool is_flush, size_t write_index) {
  if (free_slots_.empty()) {
    slot_storage_.push_back(std::make_unique<Slot>());
    free_slots_.push_back(slot_storage_.back().get());
  }
  Slot* slot = free_slots_.back();
  slot->transfer = &t;
  slot->run = &run;
  slot->write_index = write_index;
  slot->flush = is_flush;
  absl::StatusOr<PostResult> result = PostToBackend(write, slot);
  if (!result.ok() || *result == PostResult::kQueueFull) {
    slot->transfer = nullptr;
    slot->run = nullptr;
    return result;
  }
  free_slots_.pop_back();
  slot->in_use = true;
  ++t.in_flight;
  ++run.in_flight;
  ++in_flight_;
  return result;
}

void WriteEngine::HandleCompletions() {
  for (Completion& c : completions_) {
    Slot* slot = static_cast<Slot*>(c.context);
    Transfer* t = slot->transfer;
    PeerRun* run = slot->run;
    const bool flush = slot->flush;
    const size_t write_index = slot->write_index;
    slot->transfer = nullptr;
    slot->run = nullptr;
    slot->in_use = false;
    free_slots_.push_back(slot);
    --in_flight_;
    if (t == nullptr) continue;  // A zombie's late completion (invariant 6).
    --run->in_flight;
    --t->in_flight;
    run->accepted_any = true;
    if (flush) {
      t->flush = c.status.ok() ? Transfer::Flush::kOk : Transfer::Flush::kFailed;
    } else if (c.status.ok()) {
      ++t->pieces_done;
      if (t->parked && t->in_flight == 0 && !t->failed) {
        // Invariant 4: every other piece completed; the last one may go now.
        t->parked = false;
        t->queued = true;
        run->queue.push_front(t);
        if (!run->ready) {
          run->ready = true;
          ready_.push_back(run);
        }
      }
    } else {
      t->piece_error = !c.connection_lost;
      run->accepted_any = false;  // Until it takes a write again (see FireTimers).
      // Semantics 8: the target refused or dropped it; a network target cannot say
      // which, so every backend reports Unavailable.
      Fail(*t, absl::UnavailableError(absl::StrCat(
                   "remote write failed: peer=", run->backend.name, " transfer=", t->id,
                   " write=", write_index, ": ", c.status.message())));
    }
    Touch(*t);
    if (!c.status.ok() && c.connection_lost && !run->removed) {
      // Every write in flight on the dead connection fails with this one (their late
      // completions find zombie slots); the next write connects afresh.
      Reset(*run, absl::StrCat("the connection broke under transfer=", t->id),
            /*connection_died=*/true);
    }
  }
}

bool WriteEngine::PostReady() {
  bool busy = false;
  // Round-robin: each ready peer gets its turn; a peer that cannot take more this
  // round (window full, queue full, nothing left) never holds up the next one.
  size_t kept = 0;
  for (size_t i = 0; i < ready_.size(); ++i) {
    PeerRun* run = ready_[i];
    busy |= PostForPeer(*run);
    if (run->queue.empty() && run->flushes.empty()) {
      run->ready = false;
    } else {
      ready_[kept++] = run;
    }
  }
  ready_.resize(kept);
  return busy;
}

bool WriteEngine::PostForPeer(PeerRun& run) {
  bool busy = false;
  const uint64_t max_piece = std::max<uint64_t>(1, options_.max_write_bytes);
  auto has_room = [&] {
    return run.in_flight < options_.peer_window && in_flight_ < options_.max_in_flight;
  };
  // Flushes first: they settle failed transfers, and are one byte each.
  while (!run.flushes.empty() && has_room()) {
    Transfer* t = run.flushes.front();
    const ResolvedWrite& first = t->writes.front();
    PostedWrite flush;
    flush.local = first.local;
    flush.local_desc = first.local_desc;
    flush.peer = run.backend.handle;
    flush.remote_address = first.remote_address;
    flush.remote_key = first.remote_key;
    // The transfer's first byte again: it was posted first and completed, and the
    // source may not change before kQuiesced, so this rewrites the value it already
    // wrote (a zero-length write would be cheaper, but shm 1.17 never completes a
    // zero-length delivery-complete write and then stalls the peer).
    flush.length = 1;
    flush.deliver_complete = true;
    absl::StatusOr<PostResult> result = Post(run, *t, flush, /*is_flush=*/true, 0);
    if (result.ok() && *result == PostResult::kQueueFull) return busy;
    busy = true;
    run.flushes.pop_front();
    t->flush = result.ok() ? Transfer::Flush::kInFlight : Transfer::Flush::kFailed;
    if (!result.ok()) Touch(*t);
  }
  while (!run.queue.empty()) {
    Transfer* t = run.queue.front();
    if (t->failed || t->finished) {
      // Semantics 2: what a failed transfer has not posted is dropped.
      run.queue.pop_front();
      t->queued = false;
      busy = true;
      if (t->finished) {
        transfers_.erase(t->id);
      } else {
        Touch(*t);
      }
      continue;
    }
    if (!has_room()) break;
    const ResolvedWrite& w = t->writes[t->next_write];
    const uint64_t length = std::min(max_piece, w.length - t->next_offset);
    const bool last = t->next_write + 1 == t->writes.size() && t->next_offset + length == w.length;
    if (last && t->pieces_done != t->pieces_total - 1) {
      // Invariant 4: park it until its other pieces complete; later transfers to
      // this peer go ahead meanwhile.
      run.queue.pop_front();
      t->queued = false;
      t->parked = true;
      continue;
    }
    PostedWrite piece;
    piece.local = w.local + t->next_offset;
    piece.local_desc = w.local_desc;
    piece.peer = run.backend.handle;
    piece.remote_address = w.remote_address + t->next_offset;
    piece.remote_key = w.remote_key;
    piece.length = length;
    piece.deliver_complete = last;
    absl::StatusOr<PostResult> result = Post(run, *t, piece, /*is_flush=*/false, t->next_write);
    if (result.ok() && *result == PostResult::kQueueFull) {
      // This peer's queue is full (or its connection is still coming up): skip it
      // for this round, the others go on (semantics 7).
      return busy;
    }
    busy = true;
    if (!result.ok()) {
      Fail(*t, absl::Status(result.status().code(),
                            absl::StrCat("posting a remote write failed: peer=",
                                         run.backend.name, " transfer=", t->id, " write=",
                                         t->next_write, ": ", result.status().message())));
      continue;
    }
    run.accepted_any = true;
    ++t->pieces_posted;
    t->next_offset += length;
    if (t->next_offset == w.length) {
      ++t->next_write;
      t->next_offset = 0;
    }
    if (t->fully_posted()) {
      run.queue.pop_front();
      t->queued = false;
    }
  }
  return busy;
}

void WriteEngine::FireTimers(absl::Time now) {
  // Entries of finished transfers are dropped lazily; rebuild the heap before they
  // outnumber the live ones, so it stays O(live transfers) under a steady stream.
  if (timers_.size() > 2 * transfers_.size() + 1024) {
    std::vector<std::pair<absl::Time, TransferId>> live;
    live.reserve(2 * transfers_.size());
    for (const auto& [id, t] : transfers_) {
      if (t->finished) continue;
      live.emplace_back(t->deadline, id);
      if (t->failed) live.emplace_back(t->failed_at + options_.quiesce_timeout, id);
    }
    timers_ = decltype(timers_)(std::greater<>(), std::move(live));
  }
  while (!timers_.empty() && timers_.top().first <= now) {
    const TransferId id = timers_.top().second;
    timers_.pop();
    auto it = transfers_.find(id);
    if (it == transfers_.end() || it->second->finished) continue;
    Transfer& t = *it->second;
    if (!t.failed) {
      if (now < t.deadline) continue;
      if (!t.run->accepted_any) {
        // The peer never took a single write: it is not there (semantics 8).
        Fail(t, absl::UnavailableError(absl::StrCat(
                    "peer accepted no write before the transfer deadline (unreachable, "
                    "gone or stuck): peer=", t.run->backend.name, " transfer=", t.id)));
      } else {
        Fail(t, absl::DeadlineExceededError(absl::StrCat(
                    "transfer deadline passed: peer=", t.run->backend.name, " transfer=", t.id,
                    " pieces_done=", t.pieces_done, " pieces_total=", t.pieces_total,
                    " pieces_in_flight=", t.in_flight)));
      }
      Touch(t);
    } else if (now >= t.failed_at + options_.quiesce_timeout) {
      // Semantics 3: its writes (or its flush) did not end in time; cut the connection.
      Reset(*t.run, absl::StrCat("transfer=", t.id, " did not quiesce within ",
                                 absl::FormatDuration(options_.quiesce_timeout)));
    }
  }
}

void WriteEngine::Fail(Transfer& t, absl::Status error) {
  if (t.failed || t.finished) return;
  t.failed = true;
  t.error = DeepCopy(error);
  t.failed_at = absl::Now();
  if (t.parked) t.parked = false;  // Its last piece will never go.
  timers_.emplace(t.failed_at + options_.quiesce_timeout, t.id);
  Outcome& outcome = outcomes_.emplace_back();
  outcome.id = t.id;
  outcome.status.state = TransferState::kFailed;
  outcome.status.error = t.error;
  Touch(t);
}

void WriteEngine::Touch(Transfer& t) {
  if (t.touched) return;
  t.touched = true;
  touched_.push_back(&t);
}

// Produces the final outcome of `t` once it has one (semantics 1 and 3).
void WriteEngine::Settle(Transfer& t) {
  if (t.finished) return;
  TransferStatus final_status;
  if (!t.failed) {
    if (t.pieces_done != t.pieces_total) return;
    final_status.state = TransferState::kDone;
  } else {
    if (t.in_flight > 0) return;  // FireTimers resets the peer if this takes too long.
    final_status.state = TransferState::kQuiesced;
    final_status.error = t.error;
    if (t.connection_died) {
      final_status.target_settled = true;
    } else if (t.reset || t.piece_error) {
      final_status.target_settled = false;
    } else if (t.pieces_posted == 0 || t.pieces_done == t.pieces_total) {
      final_status.target_settled = true;  // Nothing posted, or delivered whole.
    } else if (t.flush == Transfer::Flush::kNone) {
      // Invariant 5: a delivery-complete flush behind its completed pieces.
      t.flush = Transfer::Flush::kWanted;
      t.run->flushes.push_back(&t);
      if (!t.run->ready) {
        t.run->ready = true;
        ready_.push_back(t.run);
      }
      return;
    } else if (t.flush == Transfer::Flush::kWanted) {
      return;
    } else {
      final_status.target_settled = t.flush == Transfer::Flush::kOk;
    }
  }
  t.finished = true;
  Outcome& outcome = outcomes_.emplace_back();
  outcome.id = t.id;
  outcome.status = final_status;
  outcome.regions = t.regions;
  outcome.writes = static_cast<int64_t>(t.writes.size());
  PeerRun* run = t.run;
  run->active.erase(&t);
  if (!t.queued) transfers_.erase(t.id);  // Else erased when its run pops it.
  if (run->removed && run->active.empty() && run->queue.empty()) {
    if (run->ready) {
      ready_.erase(std::find(ready_.begin(), ready_.end(), run));
    }
    runs_.erase(run->id);
  }
}

void WriteEngine::Reset(PeerRun& run, absl::string_view why, bool connection_died) {
  absl::StatusOr<uint64_t> handle = ResetPeer(run.backend);
  if (handle.ok()) run.backend.handle = *handle;
  for (Transfer* t : run.active) {
    // One abandoned by an earlier reset sent on a connection this side closed: the
    // target may still be reading it, so it stays unsettled.
    t->connection_died = connection_died && !t->reset;
    if (!t->failed) {
      Fail(*t, absl::UnavailableError(absl::StrCat("connection to the peer was reset: peer=",
                                                   run.backend.name, " transfer=", t->id,
                                                   " because ", why)));
    }
  }
  Abandon(run);
}

// Gives up on everything in flight to `run`: its slots become zombies (invariant 6)
// and its transfers quiesce unsettled.
void WriteEngine::Abandon(PeerRun& run) {
  if (run.in_flight > 0) {
    for (const std::unique_ptr<Slot>& slot : slot_storage_) {
      if (slot->in_use && slot->run == &run) {
        slot->transfer = nullptr;
        slot->run = nullptr;
      }
    }
  }
  run.in_flight = 0;
  for (Transfer* t : run.queue) {
    t->queued = false;
    if (t->finished) transfers_.erase(t->id);
  }
  run.queue.clear();
  run.flushes.clear();
  for (Transfer* t : run.active) {
    t->in_flight = 0;
    t->parked = false;
    t->reset = true;
    Touch(*t);
  }
}

void WriteEngine::Publish() {
  if (outcomes_.empty()) return;
  {
    MutexLock lock(&mu_);
    for (Outcome& outcome : outcomes_) {
      auto it = records_.find(outcome.id);
      if (it == records_.end()) continue;
      TransferStatus& status = it->second.status;
      const TransferState was = status.state;
      if (outcome.status.state == TransferState::kFailed) {
        // Semantics 2; the first error wins (a caller's cancel may have come first).
        if (was == TransferState::kInProgress) {
          status.state = TransferState::kFailed;
          status.error = DeepCopy(outcome.status.error);
        }
        continue;
      }
      // A final outcome. Invariant 3: a transfer already reported failed stays failed,
      // even if all its bytes arrived after all.
      if (was == TransferState::kFailed || outcome.status.state == TransferState::kQuiesced) {
        status.state = TransferState::kQuiesced;
        if (was == TransferState::kInProgress) status.error = DeepCopy(outcome.status.error);
        status.target_settled = outcome.status.state == TransferState::kDone ||
                                outcome.status.target_settled;
      } else {
        status.state = TransferState::kDone;
      }
      for (RegionId region : outcome.regions) {
        auto r = regions_.find(region);
        if (r != regions_.end()) --r->second.busy_transfers;
      }
      queued_writes_ -= outcome.writes;
    }
    outcomes_.clear();
    done_cv_.SignalAll();
  }
  if (options_.on_transfer_update) options_.on_transfer_update();
}

}  // namespace kvx::transport_internal
