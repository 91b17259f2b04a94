// Do not include directly. Internal to //transport and its backends.
// IWYU pragma: private
//
// WriteEngine: the backend-independent half of a Transport. It owns the region and
// peer tables, validates and splits writes, tracks transfers and their deadlines, and
// runs the endpoint's owner thread, which posts writes within a bounded window,
// retries when the backend's queue is full, progresses completions and publishes
// results. A backend derives from it and supplies the hooks below; every backend
// therefore shares the same bounds checks, error messages and failure paths.
//
// Invariants:
//   1. Only the owner thread calls PostToBackend and PollBackend.
//   2. A region's `busy_pieces` counts pieces that use it and are queued or in flight;
//      DeregisterMemory refuses while it is non-zero.
//   3. A transfer's result is published once: OK when all pieces completed; its first
//      error once none of its pieces is in flight; DeadlineExceeded when its deadline
//      passes first. Pieces still queued after an error are dropped, not posted.
//   4. The last piece of a transfer is posted (with deliver_complete) only after all
//      its other pieces completed, so its completion implies delivery of the whole
//      transfer on providers whose plain completions mean "sent", not "delivered".
//
// Thread safety: public methods are thread-safe. Derived classes must call
// StartOwnerThread() at the end of their constructor and StopOwnerThread() first in
// their destructor, before tearing down what the hooks use.

#ifndef KVX_TRANSPORT_INTERNAL_WRITE_ENGINE_H_
#define KVX_TRANSPORT_INTERNAL_WRITE_ENGINE_H_

#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <thread>  // NOLINT(build/c++11)
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/node_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "transport/internal/mutex.h"
#include "transport/transport.h"

namespace kvx::transport_internal {

// What a backend keeps for a registered region.
struct BackendRegion {
  void* desc = nullptr;    // Local descriptor passed with each write (fi_mr_desc).
  void* handle = nullptr;  // Backend-owned object (the fid_mr), for deregistration.
  transport::RegionDescriptor descriptor;
};

// What a backend keeps for a peer.
struct BackendPeer {
  uint64_t handle = 0;  // fi_addr_t, or the loopback endpoint id.
  std::string name;     // Printable, for error messages.
};

// One piece of a write, resolved for posting.
struct PostedWrite {
  const char* local = nullptr;
  void* local_desc = nullptr;
  uint64_t peer = 0;
  uint64_t remote_address = 0;
  uint64_t remote_key = 0;
  uint64_t length = 0;
  bool deliver_complete = false;  // Last piece of its transfer.
};

// A completed piece: `context` as given to PostToBackend.
struct Completion {
  void* context = nullptr;
  absl::Status status;
};

// Size of the scratch space at the start of every context handed to the backend
// (libfabric's struct fi_context2 is 64 bytes).
inline constexpr size_t kBackendContextBytes = 64;

struct EngineOptions {
  uint64_t max_write_bytes = uint64_t{1} << 30;  // Larger writes are split.
  int64_t window = 64;  // Pieces in flight at the backend at most.
  // How long the owner thread sleeps between polls when it has nothing in flight.
  // Zero spins (yielding). Providers with manual progress (tcp, shm) need polls even
  // on an idle target, so this also bounds how long incoming writes wait.
  absl::Duration idle_poll_interval = absl::Microseconds(50);
};

class WriteEngine : public transport::Transport {
 public:
  ~WriteEngine() override;

  absl::StatusOr<transport::LocalRegion> RegisterMemory(void* base, uint64_t length,
                                                        transport::MemoryKind kind =
                                                            transport::MemoryKind::kHost) override;
  absl::Status DeregisterMemory(int64_t region_id) override;
  absl::StatusOr<transport::PeerId> AddPeer(absl::string_view address) override;
  absl::StatusOr<transport::TransferId> PostWrites(transport::PeerId peer,
                                                   absl::Span<const transport::WriteOp> writes,
                                                   absl::Time deadline) override;
  absl::StatusOr<transport::TransferState> PollTransfer(transport::TransferId id) override;
  absl::Status WaitTransfer(transport::TransferId id, absl::Time wait_deadline) override;

 protected:
  explicit WriteEngine(const EngineOptions& options);

  void StartOwnerThread();
  void StopOwnerThread();
  const EngineOptions& engine_options() const { return options_; }

  // Hooks. Register/Deregister/ResolvePeer run on the caller's thread; the backend
  // makes them safe against its own owner-thread calls.
  virtual absl::StatusOr<BackendRegion> RegisterWithBackend(void* base, uint64_t length,
                                                            transport::MemoryKind kind) = 0;
  virtual void DeregisterWithBackend(const BackendRegion& region) = 0;
  virtual absl::StatusOr<BackendPeer> ResolvePeer(absl::string_view address) = 0;
  // Owner thread only. Returns kQueueFull when the backend cannot take the piece now
  // (-FI_EAGAIN: the engine progresses and retries the same piece later); an error
  // fails the piece. `context` stays valid until the piece's Completion is returned and starts
  // with kBackendContextBytes of scratch the backend may use.
  enum class PostResult { kPosted, kQueueFull };
  virtual absl::StatusOr<PostResult> PostToBackend(const PostedWrite& write,
                                                   void* context) = 0;
  // Owner thread only. Progresses the backend and appends finished pieces.
  virtual void PollBackend(std::vector<Completion>* completions) = 0;

 private:
  struct Region {
    char* base = nullptr;
    uint64_t length = 0;
    BackendRegion backend;
    int64_t busy_pieces = 0;
  };
  struct Piece {
    transport::TransferId transfer = 0;
    int64_t write_index = 0;
    int64_t region_id = 0;
    PostedWrite write;
    bool last = false;
  };
  struct Progress;
  // A posted batch; the owner thread walks `pieces` in place from `next`.
  struct NewTransfer {
    transport::TransferId id = 0;
    absl::Time deadline;
    std::string peer_name;
    std::vector<Piece> pieces;
    size_t next = 0;
    Progress* progress = nullptr;  // Owner thread: set when taken from submitted_.
  };
  // Owner-thread state of one transfer.
  struct Progress {
    absl::Time deadline;
    std::string peer_name;
    int64_t total = 0;
    int64_t done = 0;
    int64_t in_flight = 0;
    int64_t queued = 0;
    absl::Status error;
    bool published = false;
  };
  // Context handed to the backend; the scratch must stay the first member.
  struct Slot {
    alignas(16) unsigned char backend_context[kBackendContextBytes];
    transport::TransferId transfer = 0;
    int64_t write_index = 0;
    int64_t region_id = 0;
  };

  void OwnerLoop();
  // Owner thread: one round of posting; returns true if anything was posted or dropped.
  bool PostPending();
  void FinishPiece(int64_t region_id);
  void Publish(transport::TransferId id, absl::Status status);

  const EngineOptions options_;

  Mutex mu_;
  CondVar work_cv_;  // Owner thread waits here when idle.
  CondVar done_cv_;  // WaitTransfer waits here.
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  int64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  absl::flat_hash_map<int64_t, Region> regions_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<transport::PeerId, BackendPeer> peers_ ABSL_GUARDED_BY(mu_);
  std::vector<NewTransfer> submitted_ ABSL_GUARDED_BY(mu_);
  // Transfers posted and not yet returned to a caller, with their result once ended.
  absl::flat_hash_map<transport::TransferId, std::optional<absl::Status>> transfers_
      ABSL_GUARDED_BY(mu_);

  // Owner thread only.
  std::deque<NewTransfer> pending_;
  // Node map: Progress pointers stay valid while other transfers come and go.
  absl::node_hash_map<transport::TransferId, Progress> progress_;
  std::vector<Slot> slots_;
  std::vector<Slot*> free_slots_;
  std::vector<Completion> completions_;
  // Busy counts to release, batched as (region, pieces) runs.
  std::vector<std::pair<int64_t, int64_t>> finished_regions_;
  std::vector<std::pair<transport::TransferId, absl::Status>> results_;  // To publish.

  std::thread owner_;
};

}  // namespace kvx::transport_internal

#endif  // KVX_TRANSPORT_INTERNAL_WRITE_ENGINE_H_
