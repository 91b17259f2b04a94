// Do not include directly. Internal to //transport and its backends.
// IWYU pragma: private
//
// WriteEngine: the backend-independent half of a Transport. It owns the region, grant
// and peer tables, validates writes, tracks transfers, their deadlines and their
// quiescence, and runs the endpoint's owner thread, which splits writes into pieces
// and posts them per peer within bounded windows, retries a peer whose queue is full
// without holding up the others, progresses completions and publishes results. A
// backend derives from it and supplies the hooks below, so every backend shares the
// same bounds checks, error codes and failure paths.
//
// Invariants:
//   1. Only the owner thread calls the owner-thread hooks (posting, polling,
//      revoking grants, resetting and forgetting peers).
//   2. A region's `busy_transfers` counts the non-final transfers that read it;
//      DeregisterMemory refuses while it is non-zero or any peer holds a grant on it.
//   3. A transfer's caller-visible state only moves forward: kInProgress, then kDone,
//      or kFailed then kQuiesced. The first error wins. A transfer whose caller saw
//      kFailed never becomes kDone.
//   4. The last piece of a transfer is posted (with deliver_complete) only after all
//      its other pieces completed, so its completion implies delivery of the whole
//      transfer on providers whose plain completions mean "sent, in order" (tcp).
//   5. A failed transfer whose posted pieces all completed is settled by one more
//      delivery-complete write behind them (a flush: its first byte, rewritten from
//      the unchanged source); if its pieces or the flush do not end within
//      `quiesce_timeout`, the peer's connection is reset (unsettled). A piece that
//      fails because its connection broke (the backend says so: the target closed
//      it) resets the connection at once, and the transfers on it are settled:
//      nothing sent on a closed connection lands any more.
//   6. A slot (the context handed to the backend) returns to the free list only when
//      the backend completes it. Slots of pieces abandoned by a reset or a removed
//      peer stay allocated ("zombies") until then, so a late completion never lands
//      in reused bookkeeping.
//   7. Per peer at most `peer_window` pieces are in flight, on the endpoint at most
//      `max_in_flight` (zombies included); a peer whose queue is full (kQueueFull) is
//      skipped for the rest of the round, never waited on.
//
// Thread safety: public methods are thread-safe. Derived classes must call
// StartOwnerThread() at the end of their constructor and StopOwnerThread() first in
// their destructor, before tearing down what the hooks use.

#ifndef KVX_TRANSPORT_INTERNAL_WRITE_ENGINE_H_
#define KVX_TRANSPORT_INTERNAL_WRITE_ENGINE_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <queue>
#include <string>
#include <thread>  // NOLINT(build/c++11)
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/inlined_vector.h"
#include "absl/container/node_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "transport/internal/mutex.h"
#include "transport/transport.h"

namespace kvx::transport_internal {

// What a backend keeps for a registered region (local access only).
struct BackendRegion {
  void* desc = nullptr;    // Local descriptor passed with each write (fi_mr_desc).
  void* handle = nullptr;  // Backend-owned object (the fid_mr), for deregistration.
  transport::MemoryKind kind = transport::MemoryKind::kHost;
};

// What a backend keeps for one peer's remote write access to one region.
struct BackendGrant {
  void* handle = nullptr;  // Backend-owned object, for revocation.
  transport::RegionDescriptor descriptor;
};

// What a backend keeps for a peer.
struct BackendPeer {
  uint64_t handle = 0;  // fi_addr_t, or the loopback endpoint id.
  std::string name;     // Printable, for error messages.
  std::string raw;      // The backend's own address bytes, for reconnecting.
};

// One piece of a write, resolved for posting.
struct PostedWrite {
  const char* local = nullptr;
  void* local_desc = nullptr;
  uint64_t peer = 0;
  uint64_t remote_address = 0;
  uint64_t remote_key = 0;
  uint64_t length = 0;
  bool deliver_complete = false;
};

// A completed piece: `context` as given to PostToBackend.
struct Completion {
  void* context = nullptr;
  absl::Status status;
  // The backend saw the connection to the peer break (reset, closed by the peer):
  // nothing more goes through it, so the engine resets the peer (ResetPeer) and the
  // next write connects afresh.
  bool connection_lost = false;
};

// Size of the scratch space at the start of every context handed to the backend
// (libfabric's struct fi_context2 is 64 bytes).
inline constexpr size_t kBackendContextBytes = 64;

// The options a backend resolved: max_write_bytes and max_in_flight are set (> 0).
using EngineOptions = transport::EndpointOptions;

class WriteEngine : public transport::Transport {
 public:
  ~WriteEngine() override;

  absl::StatusOr<transport::RegionId> RegisterMemory(
      void* base, uint64_t length,
      transport::MemoryKind kind = transport::MemoryKind::kHost) override;
  absl::Status DeregisterMemory(transport::RegionId region_id) override;
  absl::StatusOr<transport::PeerId> AddPeer(absl::string_view address) override;
  absl::Status RemovePeer(transport::PeerId peer) override;
  absl::StatusOr<transport::RegionDescriptor> GrantRemoteWrite(transport::RegionId region,
                                                               transport::PeerId peer) override;
  absl::StatusOr<transport::TransferId> PostWrites(transport::PeerId peer,
                                                   absl::Span<const transport::WriteOp> writes,
                                                   absl::Time deadline) override;
  absl::Status CancelTransfer(transport::TransferId id) override;
  absl::StatusOr<transport::TransferStatus> PollTransfer(transport::TransferId id) override;
  absl::StatusOr<transport::TransferStatus> WaitTransfer(transport::TransferId id,
                                                         absl::Time wait_deadline) override;

  // Test hook: while paused the owner thread neither posts nor progresses, like the
  // endpoint of a stopped process.
  void PauseForTest(bool paused);

 protected:
  explicit WriteEngine(const EngineOptions& options);

  void StartOwnerThread();
  void StopOwnerThread();
  const EngineOptions& engine_options() const { return options_; }

  // Hooks that run on the caller's thread; the backend makes them safe against its
  // own owner-thread hooks.
  virtual absl::StatusOr<BackendRegion> RegisterWithBackend(void* base, uint64_t length,
                                                            transport::MemoryKind kind) = 0;
  virtual void DeregisterWithBackend(const BackendRegion& region) = 0;
  // Registers remote write access to [base, base + length) for `peer` only, under a
  // fresh random key. Also called to undo a grant that lost a race (then `revoke`
  // runs on the caller's thread: the descriptor was never given out).
  virtual absl::StatusOr<BackendGrant> GrantWithBackend(const BackendRegion& region,
                                                        char* base, uint64_t length,
                                                        const BackendPeer& peer) = 0;
  virtual absl::StatusOr<BackendPeer> ResolvePeer(absl::string_view address) = 0;

  // Owner thread only (except RevokeWithBackend for a grant never given out).
  virtual void RevokeWithBackend(const BackendGrant& grant) = 0;
  // Tears down the connection to `peer`, failing what is in flight to it, and returns
  // the handle to use from now on. Returns kQueueFull semantics through the statuses
  // of the abandoned pieces' completions, if the backend ever reports them.
  virtual absl::StatusOr<uint64_t> ResetPeer(const BackendPeer& peer) = 0;
  // Tears down the connection to `peer` and forgets its address.
  virtual void ForgetPeer(const BackendPeer& peer) = 0;
  // Returns kQueueFull when the backend cannot take the piece now (-FI_EAGAIN: the
  // engine retries the same piece in a later round); an error fails the piece.
  // `context` stays valid until the piece's Completion is returned and starts with
  // kBackendContextBytes of scratch the backend may use.
  enum class PostResult { kPosted, kQueueFull };
  virtual absl::StatusOr<PostResult> PostToBackend(const PostedWrite& write,
                                                   void* context) = 0;
  // Progresses the backend and appends finished pieces.
  virtual void PollBackend(std::vector<Completion>* completions) = 0;

 private:
  struct Transfer;
  struct PeerRun;
  struct Slot;
  struct Command;

  // Caller-visible, under mu_.
  struct Region {
    char* base = nullptr;
    uint64_t length = 0;
    BackendRegion backend;
    int64_t busy_transfers = 0;
    int64_t pending_grants = 0;  // Grants being registered outside the lock.
    absl::flat_hash_map<transport::PeerId, BackendGrant> grants;
  };
  struct Peer {
    BackendPeer backend;
    std::string address;
  };
  struct Record {
    transport::TransferStatus status;
    transport::PeerId peer = 0;
    int64_t writes = 0;
  };

  void OwnerLoop();
  // Owner-thread steps of one round.
  void TakeSubmissions(std::vector<std::unique_ptr<Transfer>>* incoming,
                       std::vector<Command>* commands);
  void RunCommand(const Command& command);
  void HandleCompletions();
  bool PostReady();
  bool PostForPeer(PeerRun& run);
  void FireTimers(absl::Time now);
  void Fail(Transfer& t, absl::Status error);
  void Touch(Transfer& t);
  void Settle(Transfer& t);
  // Cuts the connection to `run`'s peer (the next write connects afresh) and fails
  // every transfer to it. `connection_died`: it had broken already, so they are
  // settled; else they are not (invariant 5).
  void Reset(PeerRun& run, absl::string_view why, bool connection_died = false);
  void Abandon(PeerRun& run);
  void Publish();
  // Hands `write` of `t` to the backend in a fresh slot. kPosted counts it in flight;
  // kQueueFull and errors leave nothing behind.
  absl::StatusOr<PostResult> Post(PeerRun& run, Transfer& t, const PostedWrite& write,
                                  bool is_flush, size_t write_index);

  const EngineOptions options_;

  Mutex add_peer_mu_ ABSL_ACQUIRED_BEFORE(mu_);  // Serializes AddPeer and RemovePeer.
  Mutex mu_;
  CondVar work_cv_;  // The owner thread waits here when idle.
  CondVar done_cv_;  // WaitTransfer and RemovePeer wait here.
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool paused_ ABSL_GUARDED_BY(mu_) = false;
  int64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  absl::flat_hash_map<transport::RegionId, Region> regions_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<transport::PeerId, Peer> peers_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, transport::PeerId> peer_by_address_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<transport::TransferId, Record> records_ ABSL_GUARDED_BY(mu_);
  int64_t queued_writes_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::unique_ptr<Transfer>> submitted_ ABSL_GUARDED_BY(mu_);
  std::vector<Command> commands_ ABSL_GUARDED_BY(mu_);
  int64_t commands_done_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t commands_issued_ ABSL_GUARDED_BY(mu_) = 0;

  // Owner thread only.
  absl::flat_hash_map<transport::TransferId, std::unique_ptr<Transfer>> transfers_;
  absl::node_hash_map<transport::PeerId, PeerRun> runs_;
  std::vector<PeerRun*> ready_;  // Peers with pieces to post, round-robin.
  std::deque<std::unique_ptr<Slot>> slot_storage_;
  std::vector<Slot*> free_slots_;
  int64_t in_flight_ = 0;  // Zombies included.
  std::vector<Completion> completions_;
  std::vector<Transfer*> touched_;
  // Min-heap of (when, transfer): deadlines and quiesce timeouts, checked lazily.
  std::priority_queue<std::pair<absl::Time, transport::TransferId>,
                      std::vector<std::pair<absl::Time, transport::TransferId>>,
                      std::greater<>>
      timers_;
  // Results to publish at the end of the round: (id, status, busy regions to release).
  struct Outcome {
    transport::TransferId id = 0;
    transport::TransferStatus status;
    absl::InlinedVector<transport::RegionId, 1> regions;
    int64_t writes = 0;
  };
  std::vector<Outcome> outcomes_;

  std::thread owner_;
};

}  // namespace kvx::transport_internal

#endif  // KVX_TRANSPORT_INTERNAL_WRITE_ENGINE_H_
