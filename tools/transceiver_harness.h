// File: tools/transceiver_harness.h
//
// The reference engine around kvx::transceiver::Transceiver: what `transceiver demo`,
// its end-to-end tests and its benchmark run. It plays both instances of a
// disaggregated server with a small built-in model (full-attention and
// sliding-window layer groups), each rank with its own KV memory, a thread-safe
// V2-style cache manager (a free list of slots per layer group, prefix-cache hits,
// commits), the V2Adapter, a Transceiver and an engine thread; it drives a
// deterministic stream of requests (random prompt lengths, prefix hits, chunked
// slices, cancellations) from a seed both instances know, and checks every byte.
//
// The KV pattern: every byte of request `rid`'s logical KV tensor at (global layer,
// token, K/V, global head, byte) has a value derived from (rid, layer, kv, head,
// token) through splitmix64, written and checked 8 bytes at a time. Context ranks
// write it into the blocks they hold, for the layers and heads they own (from their
// page table and topology, computed here independently of the planner). Generation
// ranks fill every block they hold but will not receive (prefix hits, stale window
// blocks, a draft block) with a marker; once a request is final they check that
// every block they lacked holds exactly the pattern and every other block of the
// request still holds its marker. Slots are filled with a "free" pattern when
// released and checked when allocated again, so a byte that lands after a request
// was reported final (transceiver guarantee 1) is caught.
//
//   harness::RunOptions options;          // TP2 -> TP1 by default
//   options.transport.kind = "loopback";  // both instances in this process
//   options.workload.requests = 16;
//   absl::StatusOr<harness::RunReport> report = harness::RunInProcess(options);
//   // report->generation.succeeded == 16 - cancelled; report->ok()
//
// Thread safety: DemoCacheManager is thread-safe. An Instance is driven by one
// thread (its engine threads are its own); Progress is thread-safe.

#ifndef KVX_TOOLS_TRANSCEIVER_HARNESS_H_
#define KVX_TOOLS_TRANSCEIVER_HARNESS_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>  // NOLINT(build/c++11)
#include <vector>

#include "absl/base/attributes.h"
#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "cache_reuse/v2_adapter.h"
#include "nlohmann/json.hpp"
#include "sync/mutex.h"
#include "transfer/control_security.h"
#include "transfer/page_table.h"
#include "transfer/protocol.h"
#include "transfer/scenario.h"
#include "transfer/session.h"
#include "transfer/slice.h"
#include "transfer/topology.h"
#include "transfer/transceiver/transceiver.h"
#include "transport/transport.h"

namespace kvx::harness {

using transfer::Role;

// --- The model ------------------------------------------------------------------

// The built-in model: layer l belongs to group l % windows.size(); a group's
// window is its entry (nullopt: full attention). Default: 4 layers, full {0, 2},
// a 256-token window {1, 3}, 4 KV heads of 64 bf16, 16 tokens per block.
struct ModelOptions {
  int64_t num_layers = 4;
  int64_t num_kv_heads = 4;
  int64_t head_size = 64;
  int64_t element_bytes = 2;
  int64_t tokens_per_block = 16;
  std::vector<std::optional<int64_t>> windows = {std::nullopt, 256};
  bool is_mla = false;
};

// Errors: InvalidArgument naming the field (no group, a group without a layer,
// sizes out of [1, 2^20]).
ABSL_MUST_USE_RESULT absl::StatusOr<transfer::ModelSpec> BuildModel(const ModelOptions& options);

// How an instance is sharded. layers_per_pp empty: an even split (the first stages
// take the remainder).
struct Shape {
  int64_t tp = 1;
  int64_t pp = 1;
  std::vector<int64_t> layers_per_pp;
  bool attention_dp = false;

  int64_t ranks() const { return tp * pp; }
  int64_t dp_size() const { return attention_dp ? tp : 1; }
};

// The topology of rank `rank` (pp_rank * tp + tp_rank). Errors: InvalidArgument
// (the split does not cover `num_layers`, sizes < 1) and ValidateTopology's.
ABSL_MUST_USE_RESULT absl::StatusOr<transfer::Topology> RankTopology(const Shape& shape,
                                                                    int64_t num_layers,
                                                                    int64_t rank);

// --- The workload -----------------------------------------------------------------

// When the engine of `cancel_side` cancels a request: before its own call, right
// after it (during: after the first slice, or once the request data went out), or
// after the request was reported final (which must change nothing).
enum class CancelWhen { kNone, kBefore, kDuring, kAfter };
absl::string_view CancelWhenName(CancelWhen when);

struct Chunk {
  int64_t start = 0;
  int64_t end = 0;
};

// One request as both instances know it.
struct RequestPlan {
  uint64_t rid = 0;
  int64_t prompt_len = 0;
  // Tokens of the prompt the generation side's cache holds (its committed-token
  // count; the adapter floors it to a block). 0: no hit.
  int64_t hit_tokens = 0;
  // The slices in prompt order; one [0, prompt_len) when not chunked.
  std::vector<Chunk> chunks;
  CancelWhen cancel = CancelWhen::kNone;
  Role cancel_side = Role::kGeneration;
  // Whether the generation side's manager keeps the stale head of each window
  // (else it dropped those pages, as a V2 manager does).
  bool keep_stale = false;
  // Whether the generation side reserves one draft-token block past the prompt.
  bool draft_block = false;
  int64_t context_dp_rank = 0;
  int64_t generation_dp_rank = 0;
  // Both sides' timeout for it; none: the instance's request_timeout.
  std::optional<absl::Duration> timeout;
  // The context instance that sends it, as the generation side names it; empty:
  // the generation instance's context_name.
  std::string context_instance;

  // A cancel that may win: the request may end cancelled (or fail with Aborted).
  bool may_be_cancelled() const {
    return cancel == CancelWhen::kBefore || cancel == CancelWhen::kDuring;
  }
  std::vector<int64_t> aux_tokens() const;
};

// One request, one slice [0, prompt_len) unless `chunks` are given; no cancel.
RequestPlan MakePlan(uint64_t rid, int64_t prompt_len, int64_t hit_tokens = 0,
                     std::vector<Chunk> chunks = {});

struct WorkloadOptions {
  int64_t requests = 64;
  uint64_t seed = 1;
  uint64_t first_rid = 1;
  int64_t min_prompt = 1;
  int64_t max_prompt = 4096;
  double hit_rate = 0.5;     // requests with a prefix hit
  double chunk_rate = 0.2;   // requests sent as several slices
  int64_t max_chunks = 4;
  double cancel_rate = 0.05; // requests cancelled (before, during or after)
  int64_t context_dp_size = 1;
  int64_t generation_dp_size = 1;
};

// The same plans for the same options on every machine. Errors: InvalidArgument
// naming the option out of range.
ABSL_MUST_USE_RESULT absl::StatusOr<std::vector<RequestPlan>> MakeWorkload(
    const WorkloadOptions& options, int64_t tokens_per_block);

// Blocks of one request per layer group as the generation side sees them
// (SEMANTICS.md sections 2-4): [0, stale) outside the window, [stale, first)
// cached, [first, total) received.
struct GroupBlocks {
  int64_t total = 0;
  int64_t stale = 0;
  int64_t first = 0;
};
std::vector<GroupBlocks> GenerationBlocks(const transfer::ModelSpec& model,
                                          const RequestPlan& plan);

// --- The KV pattern -----------------------------------------------------------------

// Where one rank keeps what it owns of the logical KV tensor.
class RankLayout {
 public:
  // Errors: InvalidArgument when the table and the model disagree (heads, sizes).
  ABSL_MUST_USE_RESULT static absl::StatusOr<RankLayout> Create(
      const transfer::ModelSpec& model, const transfer::RankPageTable& table);

  // A byte that is not what it should be.
  struct Mismatch {
    uint64_t offset = 0;  // in the slot
    uint8_t expected = 0;
    uint8_t actual = 0;
    std::string where;  // "layer=1 kv=0 head=2 token=37 byte=5", or "marker"
  };

  // Writes the pattern of `rid` for block position `block` of group `group` into
  // `slot` (the slot's first byte).
  void FillBlock(uint64_t rid, size_t group, int64_t block, uint8_t* slot) const;
  std::optional<Mismatch> CheckBlock(uint64_t rid, size_t group, int64_t block,
                                     const uint8_t* slot) const;
  // The whole slot: a marker of (rid, group, block), or the free pattern of (group, slot).
  void FillMarker(uint64_t rid, size_t group, int64_t block, uint8_t* slot) const;
  std::optional<Mismatch> CheckMarker(uint64_t rid, size_t group, int64_t block,
                                      const uint8_t* slot) const;
  void FillFree(size_t group, int64_t slot_id, uint8_t* slot) const;
  std::optional<Mismatch> CheckFree(size_t group, int64_t slot_id, const uint8_t* slot) const;

  uint64_t slot_bytes(size_t group) const { return groups_[group].slot_bytes; }
  int64_t pool(size_t group) const { return groups_[group].pool; }
  size_t num_groups() const { return groups_.size(); }
  // False for a group with no layer on this rank (a placeholder slot).
  bool has_layers(size_t group) const { return !groups_[group].layers.empty(); }

 private:
  struct Group {
    int64_t pool = 0;
    uint64_t slot_bytes = 0;
    std::vector<int64_t> layers;  // global ids
    std::vector<transfer::LayerBuffers> buffers;
  };
  template <typename Row>
  void ForRows(uint64_t rid, size_t group, int64_t block, Row row) const;

  std::vector<Group> groups_;
  int64_t first_head_ = 0;
  int64_t heads_ = 0;
  int64_t kvs_ = 2;
  int64_t tokens_per_block_ = 0;
  uint64_t token_bytes_ = 0;
};

// --- The cache manager ------------------------------------------------------------

// A V2-style paged manager: per layer group a free list of slots; per request
// positional tables with leading pages dropped (a window's stale head), a
// committed-token count (the prefix hit), commits recorded. Thread-safe.
class DemoCacheManager final : public cache_reuse::PagedCacheManager {
 public:
  DemoCacheManager(size_t num_groups, int64_t num_slots);

  // What one request takes in one group: `blocks` positions, the first `dropped`
  // of them not held (kEvictedBlock in the table, no slot taken).
  struct GroupNeed {
    int64_t blocks = 0;
    int64_t dropped = 0;
  };
  // Takes slots for `rid` and returns its positional table per group. Errors:
  // AlreadyExists for a request held; ResourceExhausted when a free list runs out
  // (nothing is taken then); InvalidArgument for a need per group that is not one
  // per group or negative.
  ABSL_MUST_USE_RESULT absl::StatusOr<std::vector<transfer::BlockList>> Allocate(
      uint64_t rid, int64_t committed_tokens, absl::Span<const GroupNeed> needs);
  // Gives the request's slots back. REQUIRES: the transceiver reported the request
  // final (guarantee 1), or never had it. Errors: NotFound.
  ABSL_MUST_USE_RESULT absl::Status Release(uint64_t rid);

  std::optional<int64_t> NumCommittedTokens(int64_t request_id) const override;
  absl::StatusOr<cache_reuse::ValidPages> Pages(int64_t request_id,
                                                int layer_group) const override;
  bool HasCache(int64_t request_id) const override;
  absl::Status Commit(int64_t request_id) override;

  bool committed(uint64_t rid) const;
  int64_t free_slots(size_t group) const;

 private:
  struct Request {
    int64_t committed_tokens = 0;
    std::vector<transfer::BlockList> tables;
    bool committed = false;
  };
  mutable sync::Mutex mu_;
  std::vector<std::vector<int64_t>> free_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, Request> requests_ ABSL_GUARDED_BY(mu_);
};

// --- Ranks and instances --------------------------------------------------------

// The transport: "loopback" (one process only), "tcp" (libfabric tcp;ofi_rxm),
// "shm", or any libfabric provider name ("verbs;ofi_rxm").
struct TransportOptions {
  std::string kind = "tcp";
  std::string node = "127.0.0.1";  // libfabric's address to bind (not shm)
  // Owner thread's sleep when idle; zero spins (transport.h).
  absl::Duration idle_poll_interval = absl::Microseconds(50);
  // Tests: wraps each rank's endpoint (fault injection); called on the thread that
  // creates the rank, with the rank's index.
  std::function<std::unique_ptr<transport::Transport>(std::unique_ptr<transport::Transport>,
                                                      int64_t rank)>
      wrap;
};

struct InstanceOptions {
  std::string name;
  Role role = Role::kContext;
  transfer::ModelSpec model;
  Shape shape;
  TransportOptions transport;
  std::string control_host = "127.0.0.1";  // the control plane binds tcp://HOST:0
  int64_t concurrency = 8;                  // requests in flight per rank
  // Slots per pool; 0: enough for `concurrency` requests of the workload's
  // longest prompt (plus a draft block each).
  int64_t num_slots = 0;
  absl::Duration request_timeout = absl::Seconds(60);
  absl::Duration report_grace = absl::Seconds(2);
  // TransceiverOptions' (a soak run shortens them, so what they keep drains).
  absl::Duration cancel_memory = absl::Seconds(60);
  absl::Duration request_data_ttl = absl::Seconds(60);
  // Fill released slots with the free pattern and check it when they are taken
  // again (catches bytes that land after a request was final).
  bool check_free_slots = true;
  // The context instance's name, as the generation side's requests name it.
  std::string context_name = "prefill";
  // The control plane's security (transfer/control_security.h); off by default.
  transfer::ControlSecurity control_security;
};

// One rank: its KV memory, cache manager, adapter and Transceiver.
class Rank {
 public:
  ABSL_MUST_USE_RESULT static absl::StatusOr<std::unique_ptr<Rank>> Create(
      const InstanceOptions& options, int64_t rank, int64_t num_slots);
  ~Rank();  // The Transceiver goes first, then the memory it registered.
  Rank(const Rank&) = delete;
  Rank& operator=(const Rank&) = delete;

  int64_t id() const { return id_; }
  const transfer::RankPageTable& table() const { return table_; }
  const RankLayout& layout() const { return layout_; }
  DemoCacheManager& manager() { return *manager_; }
  transceiver::Transceiver& transceiver() { return *transceiver_; }
  uint8_t* slot(size_t group, int64_t slot_id);

 private:
  Rank() = default;
  int64_t id_ = 0;
  transfer::RankPageTable table_;
  RankLayout layout_;
  uint8_t* memory_ = nullptr;
  size_t memory_bytes_ = 0;
  std::unique_ptr<DemoCacheManager> manager_;
  std::unique_ptr<cache_reuse::V2Adapter> adapter_;
  std::unique_ptr<transceiver::Transceiver> transceiver_;
};

// Counters the engines bump and a progress line reads. Thread-safe.
class Progress {
 public:
  std::atomic<int64_t> requests_total{0};
  std::atomic<int64_t> requests_done{0};
  std::atomic<int64_t> failures{0};
  std::atomic<uint64_t> bytes{0};

  // One (rank, request) became final.
  void Add(bool ok, uint64_t moved);
  // Waits until `n` (rank, request)s are final; false at `deadline`.
  bool WaitForDone(int64_t n, absl::Time deadline);

 private:
  sync::Mutex mu_;
  sync::CondVar cv_;
};

// Prints a progress line to stderr every `interval` until destroyed: rewritten in
// place with \r on a terminal, one line per `interval` * 10 otherwise.
class ProgressPrinter {
 public:
  ProgressPrinter(const Progress* progress, std::string label,
                  absl::Duration interval = absl::Milliseconds(250));
  ~ProgressPrinter();

 private:
  void Print(bool final);
  const Progress* progress_;
  const std::string label_;
  const absl::Time start_;
  const bool terminal_;
  sync::Mutex mu_;
  sync::CondVar cv_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

// What one instance saw. Requests are counted once per request (over its ranks):
// succeeded when every rank that takes part reported kFullyTransferred (and, on
// the generation side, every byte checked); cancelled when a planned cancel won
// (kCancelled, or kError with Aborted); failed otherwise.
struct SideReport {
  std::string role;
  std::string instance;
  std::string shape;      // "TP2 PP1", " DP" with attention DP
  std::string transport;  // TransportOptions::kind
  int64_t ranks = 0;
  int64_t requests = 0;
  int64_t succeeded = 0;
  int64_t cancelled = 0;
  int64_t failed = 0;
  uint64_t bytes = 0;  // moved (context: delivered; generation: reported)
  int64_t writes = 0;
  // Context side, from the transceivers: block pairs planned and blocks held that
  // did not move, summed over rank pairs.
  int64_t block_pairs = 0;
  int64_t block_pairs_skipped = 0;
  // Generation side, logical blocks of the model per group (counted once per
  // request, whatever the sharding), over succeeded requests.
  int64_t blocks_sent = 0;
  int64_t blocks_skipped_reuse = 0;
  int64_t blocks_skipped_window = 0;
  uint64_t bytes_checked = 0;
  int64_t mismatches = 0;   // requests with a wrong byte
  int64_t late_writes = 0;  // freed slots found written
  double seconds = 0;
  std::vector<double> latency_ms;  // generation side: per succeeded request
  std::vector<std::string> failures;  // the first few, each a one-line description
  transceiver::TransceiverMetrics metrics;  // summed over ranks

  bool ok() const { return failed == 0 && mismatches == 0 && late_writes == 0; }
  double percentile_ms(double p) const;
};

nlohmann::json ToJson(const SideReport& report);
// Errors: InvalidArgument naming the field that is missing or of the wrong type.
ABSL_MUST_USE_RESULT absl::StatusOr<SideReport> SideReportFromJson(const nlohmann::json& json);

// One instance of ranks and their engine threads.
class Instance {
 public:
  // Creates every rank (memory, manager, Transceiver). Errors: the options' and
  // Rank::Create's.
  ABSL_MUST_USE_RESULT static absl::StatusOr<std::unique_ptr<Instance>> Create(
      InstanceOptions options, std::vector<RequestPlan> workload);
  ~Instance();  // Stops the engines (at their next step) and joins them.

  // The control addresses of every rank, in rank order (for the peer's AddPeer).
  std::vector<std::string> control_addresses() const;
  // Generation side: adds the context instance on every rank (the eager handshake).
  ABSL_MUST_USE_RESULT absl::Status AddPeer(absl::Span<const std::string> addresses,
                                            absl::Time deadline);
  // Context side: waits until every rank finished a handshake with a generation
  // rank. Errors: DeadlineExceeded naming the ranks still waiting.
  ABSL_MUST_USE_RESULT absl::Status WaitForPeer(absl::Time deadline);

  // Starts one engine thread per rank; each issues the workload's requests that
  // concern it, at most `concurrency` at a time, in order, until all are final or
  // `deadline` passes (then the rest count as failed).
  void Start(absl::Time deadline, Progress* progress = nullptr);
  // Joins the engines and sums up. REQUIRES: Start was called.
  SideReport Wait();
  // Replaces the workload for another Start. REQUIRES: not started, or waited.
  void Reset(std::vector<RequestPlan> workload);

  // After Wait: nothing of any request is held, and nothing was written where no
  // request was. Every slot is back in its free list; no request of the workload
  // is known to a transceiver (GetStatus NotFound), its metrics count every
  // request it started as ended and hold no session; on the generation side (with
  // check_free_slots) every byte of every pool holds the free pattern again, so a
  // byte that landed outside the requests' blocks, or in them after they were
  // final, shows. With `late_request_data` (a peer that repeats itself) sessions
  // may remain: a copy of request data that comes after its request ended looks
  // like request data early for its task, and waits request_data_ttl for it.
  // Errors: DataLoss naming the rank, group, slot and byte; FailedPrecondition
  // naming what is still held.
  ABSL_MUST_USE_RESULT absl::Status CheckAtRest(bool late_request_data = false);

  Rank& rank(size_t i) { return *ranks_[i]; }
  size_t num_ranks() const { return ranks_.size(); }
  const std::vector<RequestPlan>& workload() const { return workload_; }
  const InstanceOptions& options() const { return options_; }

  // One (rank, request) outcome, written by the rank's engine.
  struct Record {
    uint64_t rid = 0;
    bool finished = false;  // the transceiver reported it final
    transfer::SessionState state = transfer::SessionState::kInit;
    absl::Status error;
    std::string problem;  // a wrong byte, a late write, wrong aux tokens, ...
    bool mismatch = false;
    bool late_write = false;
    uint64_t bytes_checked = 0;
    transceiver::RequestMetrics metrics;
  };
  // Per rank, a record per request it took part in. REQUIRES: Wait returned.
  const std::vector<std::vector<Record>>& records() const { return records_; }

 private:
  Instance() = default;
  InstanceOptions options_;
  std::vector<RequestPlan> workload_;
  std::vector<std::unique_ptr<Rank>> ranks_;
  std::vector<std::thread> engines_;
  std::vector<std::vector<Record>> records_;  // per rank, written by its engine
  std::atomic<bool> stop_{false};
  absl::Time started_;
  absl::Time deadline_;
};

// Slots per pool for `concurrency` requests of `workload` (options.num_slots == 0).
int64_t SlotsFor(const transfer::ModelSpec& model, absl::Span<const RequestPlan> workload,
                 int64_t concurrency);

// --- Runs -------------------------------------------------------------------------

struct RunOptions {
  ModelOptions model;
  Shape context;  // default TP2
  Shape generation;
  TransportOptions transport;
  WorkloadOptions workload;
  // Non-empty: these requests instead of a stream drawn from `workload`.
  std::vector<RequestPlan> plans;
  int64_t concurrency = 8;
  absl::Duration request_timeout = absl::Seconds(60);
  absl::Duration run_timeout = absl::Minutes(10);
  bool check_free_slots = true;
  bool progress = false;  // print a progress line to stderr
  std::string context_name = "prefill";
  std::string generation_name = "decode";
  // Non-empty: CurveZMQ on the control plane with each side's keys and allowlist
  // from this directory (transfer/curve_key_files.h): NAME.secret and NAME.pub for
  // both instance names.
  std::string curve_keys;

  RunOptions() { context.tp = 2; }
};

struct RunReport {
  SideReport context;
  SideReport generation;
  double seconds = 0;
  bool ok() const { return context.ok() && generation.ok(); }
};

// The options of one side's instance.
ABSL_MUST_USE_RESULT absl::StatusOr<InstanceOptions> SideOptions(const RunOptions& options,
                                                                 Role role);

// Both instances in this process (any transport): creates them, hands the
// context's addresses to the generation side, runs the workload on both and
// reports. Errors: setup failures (ranks, handshake); request failures are in the
// report, not errors.
ABSL_MUST_USE_RESULT absl::StatusOr<RunReport> RunInProcess(const RunOptions& options);

// One side in this process, for a peer elsewhere: the context side calls
// `on_addresses` with its control addresses once its ranks are up, waits for the
// generation side's handshake and runs; the generation side adds the context at
// `context_addresses` and runs. `on_report` gets the report while the ranks still
// serve their peers (a context side must answer late requests until the generation
// side is done); the ranks go away when it returns.
struct SideHooks {
  std::function<void(const std::vector<std::string>&)> on_addresses;
  std::function<void(const SideReport&)> on_report;
};
ABSL_MUST_USE_RESULT absl::StatusOr<SideReport> RunSide(
    const RunOptions& options, Role role, absl::Span<const std::string> context_addresses,
    const SideHooks& hooks);

// A human table of a run, for stdout.
std::string FormatTable(const SideReport& context, const SideReport& generation,
                        double seconds);

// --- Child processes ----------------------------------------------------------------

// A child process with a pipe to its stdin and one from its stdout (its stderr is
// ours). Killed (SIGKILL) and reaped on destruction, whatever happened.
class ChildProcess {
 public:
  // Errors: Internal naming the call that failed (pipe2, posix_spawn).
  ABSL_MUST_USE_RESULT static absl::StatusOr<std::unique_ptr<ChildProcess>> Spawn(
      const std::string& path, const std::vector<std::string>& args);
  ~ChildProcess();
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  // One line of its stdout, without the newline. Errors: DeadlineExceeded;
  // Unavailable when it closed its stdout (exited).
  ABSL_MUST_USE_RESULT absl::StatusOr<std::string> ReadLine(absl::Time deadline);
  // Writes `line` and a newline to its stdin. Errors: Unavailable when it is
  // closed (the child exited; SIGPIPE must be ignored).
  ABSL_MUST_USE_RESULT absl::Status WriteLine(absl::string_view line);
  // Closes its stdin (a child started with --exit_on_stdin_eof then exits).
  void CloseStdin();
  void Kill(int signal);
  // Waits for it to exit and returns its exit status (128 + signal when killed).
  // Errors: DeadlineExceeded (it is still running).
  ABSL_MUST_USE_RESULT absl::StatusOr<int> Wait(absl::Time deadline);
  int pid() const { return pid_; }

 private:
  ChildProcess() = default;
  int pid_ = -1;
  int stdin_ = -1;
  int stdout_ = -1;
  std::string buffer_;
  bool reaped_ = false;
};

// Exits this process when `fd` reaches end of file: a child's tie to its parent,
// which holds the other end of the pipe. Status 0 once `*finished` is true, else 3
// (the parent went away mid-run). Runs a detached thread; `finished` must live
// until the process ends. Each line read before (without its newline) goes to
// `on_line`, on that thread, when given.
void ExitWhenClosed(int fd, const std::atomic<bool>* finished,
                    std::function<void(std::string)> on_line = nullptr);

}  // namespace kvx::harness

#endif  // KVX_TOOLS_TRANSCEIVER_HARNESS_H_
