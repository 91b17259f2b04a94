// File: tools/transceiver_soak.h
//
// The soak mode of the reference transceiver (`transceiver demo --soak
// --seconds=N`, tools/TRANSCEIVER.md "Soak"): the same two instances serve batch
// after batch of the harness's random request stream (sizes, prefix hits, chunks,
// windows, cancels by either side), every byte checked, while faults are injected
// into every other batch: a failed write, completions delayed past their deadline
// and a dropped peer in the context instance's transports, the context instance
// removed and added again by the generation instance (its control plane). The
// instances are created once and reused (Instance::Reset), so whatever a request
// leaks accumulates; each side samples its process (RSS, peak RSS, open file
// descriptors, threads) and its instance (transport regions, peers and transfers,
// the transceivers' sessions, live requests and remembered cancels) after every
// batch, and once more after a drain at the end.
//
// A driver (RunSoak) plans the batches, hands each to both sides, checks what they
// report and, at the end, that no resource grew past its slack since the warm-up.
// The sides are in this process (loopback) or child processes (any libfabric
// provider), which get the batches as JSON lines on stdin and answer on stdout:
//
//   SoakOptions soak;                 // 60 s, 300 requests a batch, every fault
//   InProcessSoakLink context(*context_side), generation(*generation_side);
//   absl::StatusOr<SoakReport> report = RunSoak(run_options, soak, context, generation);
//   std::printf("%s", FormatSoakTable(*report).c_str());  // report->ok()
//
// Thread safety: a SoakSide is driven by one thread at a time; CountingTransport
// and LineQueue are thread-safe.

#ifndef KVX_TOOLS_TRANSCEIVER_SOAK_H_
#define KVX_TOOLS_TRANSCEIVER_SOAK_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <thread>  // NOLINT(build/c++11)
#include <vector>

#include "absl/base/attributes.h"
#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "nlohmann/json.hpp"
#include "sync/mutex.h"
#include "tools/transceiver_harness.h"
#include "transport/fault_injecting_transport.h"
#include "transport/transport.h"

namespace kvx::harness {

// --- Faults and batches -------------------------------------------------------------

enum class FaultKind {
  kNone,
  kWrite,      // context rank: the Nth write of the batch fails (one request)
  kDelay,      // context rank: completions held past their deadline, for a window
  kDrop,       // context rank: every peer dropped (transfers cut, writes refused), for a window
  kReconnect,  // generation ranks: the context instance removed and added again
};
absl::string_view FaultKindName(FaultKind kind);
// "write", "delay", "drop", "reconnect" (and "none"). Errors: InvalidArgument.
ABSL_MUST_USE_RESULT absl::StatusOr<FaultKind> ParseFaultKind(absl::string_view name);

struct SoakOptions {
  // No batch starts after this, once every fault ran (2 * faults.size() batches).
  absl::Duration duration = absl::Seconds(60);
  int64_t batch_requests = 300;
  // Cycled through by the odd batches; the even ones are clean (and must be: a
  // fault's effects end with its batch). Empty: every batch clean.
  std::vector<FaultKind> faults = {FaultKind::kWrite, FaultKind::kDelay, FaultKind::kDrop,
                                   FaultKind::kReconnect};
  // Delay and drop stay on until this many more requests per rank ended.
  int64_t fault_window = 8;
  // Resources are compared with the first sample after this (and after batch 0).
  absl::Duration warmup = absl::Seconds(10);
  absl::Duration report_interval = absl::Seconds(10);  // a progress line on stderr
  absl::Duration batch_timeout = absl::Minutes(10);    // one batch's bound
  // Growth from the warm-up sample to the drained end allowed per process.
  int64_t rss_slack_kb = 64 << 10;
  int64_t fd_slack = 8;
  int64_t thread_slack = 2;
};

// One batch, as the driver hands it to both sides.
struct SoakBatch {
  int64_t index = 0;
  uint64_t seed = 1;       // of its request stream
  uint64_t first_rid = 1;  // rids are unique over the whole soak
  FaultKind fault = FaultKind::kNone;
  int64_t fault_rank = 0;    // kWrite, kDelay, kDrop: which context rank
  double fault_after = 0.5;  // kDelay, kDrop, kReconnect: share of the batch ended first
  int64_t fail_write = 0;    // kWrite: the write (0-based) of the batch on that rank
};
nlohmann::json ToJson(const SoakBatch& batch);
ABSL_MUST_USE_RESULT absl::StatusOr<SoakBatch> SoakBatchFromJson(const nlohmann::json& json);

// Batch `index` of a soak with `options` (the stream's seed and shapes) and `soak`:
// even batches clean, odd ones the next fault of soak.faults; ranks and moments
// rotate deterministically.
SoakBatch PlanSoakBatch(const RunOptions& options, const SoakOptions& soak, int64_t index);

// --- Resources ----------------------------------------------------------------------

// What this process holds, from /proc/self.
struct ProcessSample {
  int64_t rss_kb = 0;  // VmRSS
  int64_t hwm_kb = 0;  // VmHWM: the peak RSS so far
  int64_t fds = 0;     // entries of /proc/self/fd
  int64_t threads = 0;
};
// Errors: Internal naming the file that could not be read.
ABSL_MUST_USE_RESULT absl::StatusOr<ProcessSample> SampleProcess();

// A Transport wrapper (outermost, over a FaultInjectingTransport) that counts what
// its user holds and the faults injected below it.
class CountingTransport final : public transport::Transport {
 public:
  struct Counts {
    int64_t regions = 0;    // registered and not deregistered
    int64_t peers = 0;      // added and not removed
    int64_t transfers = 0;  // posted and not yet returned final
    // Transfers failed (or posts refused) by the injector, by fault.
    int64_t failed_writes = 0;
    int64_t delayed = 0;
    int64_t dropped = 0;
  };

  explicit CountingTransport(std::unique_ptr<transport::Transport> inner);
  Counts counts() const;

  transport::Capabilities capabilities() const override { return inner_->capabilities(); }
  std::string address() const override { return inner_->address(); }
  absl::StatusOr<transport::RegionId> RegisterMemory(void* base, uint64_t length,
                                                     transport::MemoryKind kind) override;
  absl::Status DeregisterMemory(transport::RegionId region) override;
  absl::StatusOr<transport::PeerId> AddPeer(absl::string_view address) override;
  absl::Status RemovePeer(transport::PeerId peer) override;
  absl::StatusOr<transport::RegionDescriptor> GrantRemoteWrite(transport::RegionId region,
                                                               transport::PeerId peer) override {
    return inner_->GrantRemoteWrite(region, peer);
  }
  absl::StatusOr<transport::TransferId> PostWrites(transport::PeerId peer,
                                                   absl::Span<const transport::WriteOp> writes,
                                                   absl::Time deadline) override;
  absl::Status CancelTransfer(transport::TransferId id) override {
    return inner_->CancelTransfer(id);
  }
  absl::StatusOr<transport::TransferStatus> PollTransfer(transport::TransferId id) override;
  absl::StatusOr<transport::TransferStatus> WaitTransfer(transport::TransferId id,
                                                         absl::Time deadline) override;

 private:
  // Counts an injected fault by its message; forgets a transfer returned final.
  void Saw(const absl::Status& error) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<transport::TransferStatus> Ended(
      transport::TransferId id, absl::StatusOr<transport::TransferStatus> status);

  const std::unique_ptr<transport::Transport> inner_;
  mutable sync::Mutex mu_;
  absl::flat_hash_set<transport::RegionId> regions_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<transport::PeerId> peers_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<transport::TransferId> transfers_ ABSL_GUARDED_BY(mu_);
  Counts faults_ ABSL_GUARDED_BY(mu_);
};

// One side's resources at one moment: its process, and its instance summed over
// ranks (CountingTransport's counts, the transceivers' gauges).
struct SoakSample {
  double seconds = 0;  // since the side was created
  ProcessSample process;
  int64_t regions = 0;
  int64_t peers = 0;
  int64_t transfers = 0;
  int64_t sessions = 0;
  int64_t live_requests = 0;
  int64_t remembered_cancels = 0;
};
nlohmann::json ToJson(const SoakSample& sample);
ABSL_MUST_USE_RESULT absl::StatusOr<SoakSample> SoakSampleFromJson(const nlohmann::json& json);

// The RSS growth allowed: soak.rss_slack_kb, plus AddressSanitizer's quarantine
// (256 MiB) in a build with it, where freed memory stays resident until the
// quarantine is full (LeakSanitizer looks for leaks there instead).
int64_t RssAllowanceKb(const SoakOptions& soak);

// What grew too much from `warmup` to `end` (the drained sample after the last
// batch), one line per resource naming it and the numbers; empty when nothing did.
// RSS may grow by RssAllowanceKb, file descriptors and threads by their slack;
// regions and peers not at all; transfers, sessions, live requests and remembered
// cancels must be zero.
std::vector<std::string> CheckSoakResources(const std::string& side, const SoakSample& warmup,
                                            const SoakSample& end, const SoakOptions& soak);

// --- Sides ----------------------------------------------------------------------------

// One instance of a soak, reused batch after batch.
class SoakSide {
 public:
  // Creates the instance (its transports wrapped to inject and count) and touches
  // all of its KV memory, so RSS starts at what the pools take. Errors: the
  // workload's and Instance::Create's.
  ABSL_MUST_USE_RESULT static absl::StatusOr<std::unique_ptr<SoakSide>> Create(
      const RunOptions& options, Role role, const SoakOptions& soak);

  std::vector<std::string> control_addresses() const { return instance_->control_addresses(); }
  // Context side: waits for the generation side's handshake; generation side:
  // adds the context instance at `context_addresses`.
  ABSL_MUST_USE_RESULT absl::Status Connect(absl::Span<const std::string> context_addresses,
                                            absl::Time deadline);

  // Runs one command and returns its answer:
  //   {"batch": ...}  one batch (SoakBatch), its faults; answers {"batch": index,
  //                   "report": SideReport, "faults": {...}, "sample": SoakSample}
  //   {"drain": true} waits until what the transceivers keep for a while (ended
  //                   sessions, remembered cancels) is let go, or its bound passes;
  //                   answers {"drained": bool, "sample": SoakSample}
  // Anything else, or a batch that cannot start, answers {"error": "..."}.
  nlohmann::json Execute(const nlohmann::json& command);

 private:
  SoakSide() = default;
  nlohmann::json RunBatch(const SoakBatch& batch);
  // Arms the fault of a window kind once its share of the batch ended, and ends it
  // once the window closed; returns the faults armed (0 when the batch ended first).
  int64_t Inject(const SoakBatch& batch, Progress& progress, absl::Time deadline,
                 std::vector<std::string>* problems);
  nlohmann::json Drain();
  SoakSample Sample() const;

  RunOptions options_;
  SoakOptions soak_;
  Role role_ = Role::kContext;
  absl::Time created_;
  std::vector<std::string> context_addresses_;
  std::vector<transport::FaultInjectingTransport*> faulty_;  // per rank, owned below
  std::vector<CountingTransport*> counting_;
  std::unique_ptr<Instance> instance_;
};

// How the driver reaches one side.
class SoakLink {
 public:
  virtual ~SoakLink() = default;
  // Hands a command (SoakSide::Execute's) over; its answer comes from Receive.
  ABSL_MUST_USE_RESULT virtual absl::Status Send(const nlohmann::json& command) = 0;
  // Errors: DeadlineExceeded; the link's (a child that went away).
  ABSL_MUST_USE_RESULT virtual absl::StatusOr<nlohmann::json> Receive(absl::Time deadline) = 0;
};

// A side in this process: each command runs on a thread of its own, so both sides
// of a batch run at once.
class InProcessSoakLink final : public SoakLink {
 public:
  explicit InProcessSoakLink(SoakSide* side) : side_(side) {}
  ~InProcessSoakLink() override;  // Joins the command still running.
  absl::Status Send(const nlohmann::json& command) override;
  absl::StatusOr<nlohmann::json> Receive(absl::Time deadline) override;

 private:
  SoakSide* const side_;
  std::thread thread_;
  sync::Mutex mu_;
  sync::CondVar cv_;
  std::optional<nlohmann::json> answer_ ABSL_GUARDED_BY(mu_);
};

// A side in a child process (`transceiver context|generation --soak ...`).
class ChildSoakLink final : public SoakLink {
 public:
  explicit ChildSoakLink(ChildProcess* child) : child_(child) {}
  absl::Status Send(const nlohmann::json& command) override;
  absl::StatusOr<nlohmann::json> Receive(absl::Time deadline) override;

 private:
  ChildProcess* const child_;
};

// Lines handed from one thread (a child's stdin reader) to another. Thread-safe.
class LineQueue {
 public:
  void Push(std::string line);
  // The next line; nullopt at `deadline`.
  std::optional<std::string> Pop(absl::Time deadline);

 private:
  sync::Mutex mu_;
  sync::CondVar cv_;
  std::deque<std::string> lines_ ABSL_GUARDED_BY(mu_);
};

// --- The driver -----------------------------------------------------------------------

// One side's totals over the soak.
struct SoakSideTotals {
  std::string instance;
  std::string shape;
  int64_t requests = 0;
  int64_t succeeded = 0;
  int64_t cancelled = 0;
  int64_t failed = 0;  // all in fault batches, or the soak failed
  uint64_t bytes = 0;
  uint64_t bytes_checked = 0;
  int64_t peak_rss_kb = 0;
  SoakSample warmup;
  SoakSample end;
  std::vector<SoakSample> samples;  // after each batch
  int64_t fault_events[5] = {};     // by FaultKind: faults armed
};

struct SoakReport {
  std::string transport;
  double seconds = 0;
  int64_t batches = 0;
  int64_t fault_batches = 0;
  int64_t warmup_batch = 0;  // the batch whose sample is the warm-up one
  bool drained = false;
  SoakSideTotals context;
  SoakSideTotals generation;
  // Transfers the injector failed or refused, over the context ranks.
  int64_t faulted_transfers[5] = {};
  std::vector<std::string> problems;  // empty: every check passed
  bool ok() const { return problems.empty(); }
};

// Plans batches until soak.duration has passed (and every fault ran once), runs
// each on both sides, checks their answers, drains both and checks the resources.
// Stops at the first batch that fails a check. Errors: a side that does not answer
// or answers an error (setup, a child gone); check failures are in the report.
ABSL_MUST_USE_RESULT absl::StatusOr<SoakReport> RunSoak(const RunOptions& options,
                                                        const SoakOptions& soak,
                                                        SoakLink& context, SoakLink& generation);

// What one batch's side answers must satisfy: every request accounted for, no wrong
// byte, no late write, nothing live at its end; no failure in a clean batch, only
// the failed write's request(s) in a write batch, at most the requests in flight
// around the window otherwise. One line per problem.
std::vector<std::string> CheckSoakBatch(const RunOptions& options, const SoakOptions& soak,
                                        const SoakBatch& batch, const SideReport& context,
                                        const SideReport& generation,
                                        int64_t failed_writes_injected);

// A table for people and one JSON document (the last line) for machines.
std::string FormatSoakTable(const SoakReport& report);
nlohmann::json ToJson(const SoakReport& report);

}  // namespace kvx::harness

#endif  // KVX_TOOLS_TRANSCEIVER_SOAK_H_
