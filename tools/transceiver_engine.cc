// Ranks, instances and the engine thread of each rank: the reference engine's use
// of the Transceiver, as an inference engine would write it.

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "cache_reuse/adapter.h"
#include "cache_reuse/v2_adapter.h"
#include "sync/mutex.h"
#include "tools/transceiver_harness.h"
#include "transfer/page_table.h"
#include "transfer/scenario.h"
#include "transfer/session.h"
#include "transfer/slice.h"
#include "transfer/topology.h"
#include "transfer/transceiver/transceiver.h"
#include "transport/libfabric/libfabric_transport.h"
#include "transport/loopback/loopback_transport.h"
#include "transport/transport.h"

namespace kvx::harness {
namespace {

using transceiver::RequestStatus;
using transfer::SessionState;

// Any base works for the probe: only the pools' sizes and relative places count.
constexpr uint64_t kProbeBase = 0x10000;

transceiver::TransportFactory Factory(const TransportOptions& options) {
  if (options.kind == "loopback") {
    return [](const transport::EndpointOptions& endpoint) {
      return transport::CreateLoopbackTransport(endpoint);
    };
  }
  transport::LibfabricOptions fabric;
  fabric.provider = options.kind == "tcp" ? "tcp;ofi_rxm" : options.kind;
  // shm names its endpoints itself; every other provider binds the node.
  if (options.kind != "shm") fabric.node = options.node;
  return [fabric](const transport::EndpointOptions& endpoint) {
    transport::LibfabricOptions with = fabric;
    with.endpoint = endpoint;
    return transport::CreateLibfabricTransport(with);
  };
}

bool TakesPart(const transfer::Topology& topology, int64_t dp_rank) {
  return !topology.attention_dp || topology.tp_rank == dp_rank;
}

std::string Describe(const RankLayout::Mismatch& m) {
  return absl::StrFormat("offset=%d (%s) expected=0x%02x actual=0x%02x", m.offset, m.where,
                         m.expected, m.actual);
}

// One rank's engine: issues the workload's requests in order, at most
// `concurrency` at a time, sends chunks and cancels as planned, collects final
// statuses, checks the bytes and releases pages only once a request is final.
class Engine {
 public:
  Engine(Rank& rank, const InstanceOptions& options, const std::vector<RequestPlan>& workload,
         std::vector<Instance::Record>* records, Progress* progress,
         const std::atomic<bool>* stop, absl::Time deadline)
      : rank_(rank),
        options_(options),
        workload_(workload),
        records_(records),
        progress_(progress),
        stop_(stop),
        deadline_(deadline),
        context_(options.role == Role::kContext) {}

  void Run() {
    size_t next = 0;
    for (;;) {
      if (stop_->load() || absl::Now() >= deadline_) break;
      while (next < workload_.size() &&
             static_cast<int64_t>(flights_.size()) < options_.concurrency) {
        const RequestPlan& plan = workload_[next++];
        if (TakesPart(rank_.table().topology,
                      context_ ? plan.context_dp_rank : plan.generation_dp_rank)) {
          Start(plan);
        }
      }
      if (next >= workload_.size() && flights_.empty()) return;
      const bool busy = Tick();
      // Short waits while chunks or cancels are due, so they go out "as prefill
      // proceeds"; longer ones otherwise (a final status wakes the call at once).
      const absl::Time until =
          std::min(deadline_, absl::Now() + (busy ? absl::Milliseconds(1) : absl::Milliseconds(20)));
      std::vector<RequestStatus> done =
          context_ ? rank_.transceiver().CheckContextTransferStatus(1, until)
                   : rank_.transceiver().CheckGenTransferStatus(1, until);
      for (RequestStatus& status : done) Finish(status);
    }
    // Stopped or out of time: what is still in flight is a failure. Its pages stay
    // with the transceiver (not final: guarantee 1), which fails them on destruction.
    for (auto& [rid, flight] : flights_) {
      Instance::Record& record = Record(*flight.plan);
      record.problem = absl::StrCat("not final by the end of the run: state=",
                                    transfer::SessionStateName(Current(rid)));
      Done(false);
    }
    flights_.clear();
  }

 private:
  struct Flight {
    const RequestPlan* plan = nullptr;
    std::vector<transfer::BlockList> tables;
    size_t next_chunk = 0;
    bool cancel_sent = false;
    size_t record = 0;
  };

  Instance::Record& Record(const RequestPlan& plan) {
    return (*records_)[flights_.at(plan.rid).record];
  }

  SessionState Current(uint64_t rid) const {
    absl::StatusOr<RequestStatus> status = rank_.transceiver().GetStatus(rid);
    return status.ok() ? status->state : SessionState::kInit;
  }

  void Done(bool ok, uint64_t moved = 0) {
    if (progress_ != nullptr) progress_->Add(ok, moved);
  }

  bool Cancels(const RequestPlan& plan, CancelWhen when) const {
    return plan.cancel == when && (plan.cancel_side == Role::kContext) == context_;
  }

  void Start(const RequestPlan& plan) {
    records_->push_back(Instance::Record{});
    records_->back().rid = plan.rid;
    Flight flight;
    flight.plan = &plan;
    flight.record = records_->size() - 1;
    const std::vector<GroupBlocks> blocks = GenerationBlocks(options_.model, plan);
    std::vector<DemoCacheManager::GroupNeed> needs;
    for (const GroupBlocks& b : blocks) {
      // The context side holds the whole window (its stale head dropped); the
      // generation side also holds what its prefix hit covers, maybe the stale
      // head and a draft block.
      if (context_) {
        needs.push_back({b.total, b.stale});
      } else {
        needs.push_back({b.total + (plan.draft_block ? 1 : 0), plan.keep_stale ? 0 : b.stale});
      }
    }
    absl::StatusOr<std::vector<transfer::BlockList>> tables =
        rank_.manager().Allocate(plan.rid, context_ ? 0 : plan.hit_tokens, needs);
    if (!tables.ok()) {
      records_->back().problem = tables.status().ToString();
      Done(false);
      return;
    }
    flight.tables = *std::move(tables);
    const RankLayout& layout = rank_.layout();
    Instance::Record& record = records_->back();
    for (size_t g = 0; g < flight.tables.size(); ++g) {
      for (int64_t b = 0; b < static_cast<int64_t>(flight.tables[g].size()); ++b) {
        const int64_t slot = flight.tables[g][b];
        if (slot == cache_reuse::kEvictedBlock) continue;
        uint8_t* bytes = rank_.slot(g, slot);
        if (context_) {
          // Prefill: the whole prompt's KV, before the first slice goes out.
          if (layout.has_layers(g)) layout.FillBlock(plan.rid, g, b, bytes);
          continue;
        }
        if (options_.check_free_slots && record.problem.empty()) {
          if (std::optional<RankLayout::Mismatch> m = layout.CheckFree(g, slot, bytes)) {
            record.late_write = true;
            record.problem = absl::StrCat(
                "a freed slot was written after its request was final (guarantee 1): rank=",
                rank_.id(), " group=", g, " slot=", slot, " taken by request=", plan.rid, " ",
                Describe(*m));
          }
        }
        const bool received = b >= blocks[g].first && b < blocks[g].total && layout.has_layers(g);
        if (!received) layout.FillMarker(plan.rid, g, b, bytes);
      }
    }
    flights_.emplace(plan.rid, std::move(flight));
    Flight& f = flights_.at(plan.rid);
    if (Cancels(plan, CancelWhen::kBefore)) Cancel(f);
    absl::Status started;
    if (context_) {
      started = SendNextChunk(f);
    } else {
      transceiver::GenerationRequest request;
      request.unique_rid = plan.rid;
      request.prompt_len = plan.prompt_len;
      request.context_instance =
          plan.context_instance.empty() ? options_.context_name : plan.context_instance;
      request.context_dp_rank = plan.context_dp_rank;
      if (plan.chunks.size() > 1) {
        for (const Chunk& c : plan.chunks) {
          request.slices.push_back(transfer::TokenRange::Create(c.start, c.end).value());
        }
      }
      request.timeout = plan.timeout.value_or(options_.request_timeout);
      started = rank_.transceiver().RequestAndReceiveAsync(request);
    }
    if (!started.ok()) {
      // The transceiver does not hold the request: its pages are ours again.
      Record(plan).problem = absl::StrCat("the transceiver refused the request: ", started.ToString());
      Release(plan.rid);
      flights_.erase(plan.rid);
      Done(false);
    }
  }

  absl::Status SendNextChunk(Flight& f) {
    const RequestPlan& plan = *f.plan;
    const size_t i = f.next_chunk++;
    transceiver::ContextRequest request;
    request.unique_rid = plan.rid;
    request.prompt_len = plan.prompt_len;
    request.slice_id = static_cast<int64_t>(i);
    if (plan.chunks.size() > 1) {
      request.token_range =
          transfer::TokenRange::Create(plan.chunks[i].start, plan.chunks[i].end).value();
    }
    if (i + 1 == plan.chunks.size()) request.aux_tokens = plan.aux_tokens();
    request.timeout = plan.timeout.value_or(options_.request_timeout);
    return rank_.transceiver().RespondAndSendAsync(request);
  }

  void Cancel(Flight& f) {
    f.cancel_sent = true;
    absl::Status cancelled = rank_.transceiver().CancelRequest(f.plan->rid);
    if (!cancelled.ok()) Record(*f.plan).problem = cancelled.ToString();
  }

  // Sends the chunks and cancels that are due; true while some are still to come.
  bool Tick() {
    bool busy = false;
    for (auto& [rid, f] : flights_) {
      const RequestPlan& plan = *f.plan;
      if (Cancels(plan, CancelWhen::kDuring) && !f.cancel_sent) {
        // Context: after the first slice went out. Generation: once its request
        // data went out (the transfer may be under way).
        if (context_ || Current(rid) >= SessionState::kReady) {
          Cancel(f);
        } else {
          busy = true;
        }
        continue;
      }
      if (context_ && !f.cancel_sent && f.next_chunk < plan.chunks.size()) {
        absl::Status sent = SendNextChunk(f);
        if (absl::IsFailedPrecondition(sent) &&
            absl::StartsWith(sent.message(), "request already ended")) {
          // The request ended (its final status waits here): nothing more to send.
          f.next_chunk = plan.chunks.size();
        } else if (!sent.ok()) {
          Record(plan).problem = absl::StrCat("next slice refused: ", sent.ToString());
        }
        busy |= f.next_chunk < plan.chunks.size();
      }
    }
    return busy;
  }

  void Finish(const RequestStatus& status) {
    auto it = flights_.find(status.unique_rid);
    if (it == flights_.end()) return;
    Flight& f = it->second;
    const RequestPlan& plan = *f.plan;
    Instance::Record& record = (*records_)[f.record];
    record.finished = true;
    record.state = status.state;
    record.error = status.error;
    record.metrics = status.metrics;
    if (!context_) Check(f, status, &record);
    if (Cancels(plan, CancelWhen::kAfter)) {
      absl::Status cancelled = rank_.transceiver().CancelRequest(plan.rid);
      if (!cancelled.ok()) record.problem = cancelled.ToString();
    }
    Done(record.problem.empty() &&
             (status.state == SessionState::kFullyTransferred || plan.may_be_cancelled()),
         status.metrics.bytes);
    Release(plan.rid);
    flights_.erase(it);
  }

  // The generation side's checks of one final request: the bytes it lacked are the
  // pattern (only when it succeeded), every other block of the request is untouched.
  void Check(const Flight& f, const RequestStatus& status, Instance::Record* record) {
    const RequestPlan& plan = *f.plan;
    const bool success = status.state == SessionState::kFullyTransferred;
    const std::vector<GroupBlocks> blocks = GenerationBlocks(options_.model, plan);
    const RankLayout& layout = rank_.layout();
    for (size_t g = 0; g < f.tables.size() && !record->mismatch; ++g) {
      for (int64_t b = 0; b < static_cast<int64_t>(f.tables[g].size()); ++b) {
        const int64_t slot = f.tables[g][b];
        if (slot == cache_reuse::kEvictedBlock) continue;
        const uint8_t* bytes = rank_.slot(g, slot);
        const bool received = b >= blocks[g].first && b < blocks[g].total && layout.has_layers(g);
        if (received && !success) continue;  // partly written: nothing to expect
        std::optional<RankLayout::Mismatch> m =
            received ? layout.CheckBlock(plan.rid, g, b, bytes) : layout.CheckMarker(plan.rid, g, b, bytes);
        record->bytes_checked += layout.slot_bytes(g);
        if (m.has_value()) {
          record->mismatch = true;
          record->problem = absl::StrCat(
              received ? "wrong byte in a received block" : "a block it held was touched",
              ": rank=", rank_.id(), " request=", plan.rid, " state=",
              transfer::SessionStateName(status.state), " group=", g, " block=", b,
              " slot=", slot, " ", Describe(*m));
          break;
        }
      }
    }
    if (!success || !record->problem.empty()) return;
    if (status.aux_tokens != plan.aux_tokens()) {
      record->problem = absl::StrCat("wrong auxiliary tokens: request=", plan.rid, " got=[",
                                     absl::StrJoin(status.aux_tokens, ","), "] expected=[",
                                     absl::StrJoin(plan.aux_tokens(), ","), "]");
    } else if (!status.commit.ok() || !rank_.manager().committed(plan.rid)) {
      record->problem = absl::StrCat("received blocks not committed for reuse: request=",
                                     plan.rid, " commit=", status.commit.ToString());
    }
  }

  // The engine's pages go back to the free list; only for final requests or ones
  // the transceiver never took.
  void Release(uint64_t rid) {
    auto it = flights_.find(rid);
    if (it == flights_.end()) return;
    if (!context_ && options_.check_free_slots) {
      const std::vector<transfer::BlockList>& tables = it->second.tables;
      for (size_t g = 0; g < tables.size(); ++g) {
        for (int64_t slot : tables[g]) {
          if (slot != cache_reuse::kEvictedBlock) rank_.layout().FillFree(g, slot, rank_.slot(g, slot));
        }
      }
    }
    absl::Status released = rank_.manager().Release(rid);
    if (!released.ok()) Record(*it->second.plan).problem = released.ToString();
  }

  Rank& rank_;
  const InstanceOptions& options_;
  const std::vector<RequestPlan>& workload_;
  std::vector<Instance::Record>* records_;
  Progress* progress_;
  const std::atomic<bool>* stop_;
  const absl::Time deadline_;
  const bool context_;
  absl::flat_hash_map<uint64_t, Flight> flights_;
};

}  // namespace

// --- Rank -----------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Rank>> Rank::Create(const InstanceOptions& options, int64_t rank,
                                                   int64_t num_slots) {
  absl::StatusOr<transfer::Topology> topology =
      RankTopology(options.shape, options.model.num_layers, rank);
  if (!topology.ok()) return topology.status();
  absl::StatusOr<transfer::RankPageTable> probe =
      transfer::BuildStandardPageTable(options.model, *topology, num_slots, kProbeBase);
  if (!probe.ok()) return probe.status();
  uint64_t bytes = 0;
  for (const transfer::Pool& pool : probe->pools) {
    bytes = std::max(bytes, pool.base_address - kProbeBase +
                                pool.slot_bytes * static_cast<uint64_t>(pool.num_slots));
  }
  auto out = std::unique_ptr<Rank>(new Rank());
  out->id_ = rank;
  // Anonymous memory: page-aligned, and untouched pages cost nothing until used.
  void* memory = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (memory == MAP_FAILED) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot map the rank's KV memory: rank=", rank, " bytes=", bytes));
  }
  out->memory_ = static_cast<uint8_t*>(memory);
  out->memory_bytes_ = bytes;
  absl::StatusOr<transfer::RankPageTable> table = transfer::BuildStandardPageTable(
      options.model, *topology, num_slots, reinterpret_cast<uint64_t>(memory));
  if (!table.ok()) return table.status();
  out->table_ = *std::move(table);
  absl::StatusOr<RankLayout> layout = RankLayout::Create(options.model, out->table_);
  if (!layout.ok()) return layout.status();
  out->layout_ = *std::move(layout);
  if (options.role == Role::kGeneration && options.check_free_slots) {
    for (size_t g = 0; g < out->layout_.num_groups(); ++g) {
      for (int64_t s = 0; s < num_slots; ++s) out->layout_.FillFree(g, s, out->slot(g, s));
    }
  }
  out->manager_ = std::make_unique<DemoCacheManager>(out->layout_.num_groups(), num_slots);
  out->adapter_ = std::make_unique<cache_reuse::V2Adapter>(out->manager_.get(),
                                                           cache_reuse::ReuseOptions{true});
  transceiver::RankSetup setup;
  setup.page_table = out->table_;
  setup.adapter = out->adapter_.get();
  setup.create_transport = Factory(options.transport);
  if (options.transport.wrap) {
    setup.create_transport = [inner = std::move(setup.create_transport),
                              wrap = options.transport.wrap,
                              rank](const transport::EndpointOptions& endpoint)
        -> absl::StatusOr<std::unique_ptr<transport::Transport>> {
      absl::StatusOr<std::unique_ptr<transport::Transport>> created = inner(endpoint);
      if (!created.ok()) return created.status();
      return wrap(*std::move(created), rank);
    };
  }
  setup.endpoint.idle_poll_interval = options.transport.idle_poll_interval;
  transceiver::TransceiverOptions t;
  t.instance = options.name;
  t.role = options.role;
  t.control_bind = absl::StrCat("tcp://", options.control_host, ":0");
  t.default_request_timeout = options.request_timeout;
  t.report_grace = options.report_grace;
  t.cancel_memory = options.cancel_memory;
  t.request_data_ttl = options.request_data_ttl;
  t.control_security = options.control_security;
  absl::StatusOr<std::unique_ptr<transceiver::Transceiver>> created =
      transceiver::Transceiver::Create(t, std::move(setup));
  if (!created.ok()) {
    return absl::Status(created.status().code(),
                        absl::StrCat("rank ", rank, " of ", options.name, ": ",
                                     created.status().message()));
  }
  out->transceiver_ = *std::move(created);
  return out;
}

Rank::~Rank() {
  transceiver_.reset();  // ends every transfer that reads or writes the memory
  if (memory_ != nullptr) munmap(memory_, memory_bytes_);
}

uint8_t* Rank::slot(size_t group, int64_t slot_id) {
  const transfer::Pool& pool = table_.pools[layout_.pool(group)];
  return reinterpret_cast<uint8_t*>(pool.base_address) +
         pool.slot_bytes * static_cast<uint64_t>(slot_id);
}

// --- Instance -------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Instance>> Instance::Create(InstanceOptions options,
                                                           std::vector<RequestPlan> workload) {
  if (options.concurrency < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("concurrency must be positive: concurrency=", options.concurrency));
  }
  auto instance = std::unique_ptr<Instance>(new Instance());
  const int64_t slots = options.num_slots > 0
                            ? options.num_slots
                            : SlotsFor(options.model, workload, options.concurrency);
  for (int64_t r = 0; r < options.shape.ranks(); ++r) {
    absl::StatusOr<std::unique_ptr<Rank>> rank = Rank::Create(options, r, slots);
    if (!rank.ok()) return rank.status();
    instance->ranks_.push_back(*std::move(rank));
  }
  instance->options_ = std::move(options);
  instance->workload_ = std::move(workload);
  return instance;
}

Instance::~Instance() {
  stop_.store(true);
  for (std::thread& engine : engines_) {
    if (engine.joinable()) engine.join();
  }
}

std::vector<std::string> Instance::control_addresses() const {
  std::vector<std::string> addresses;
  for (const std::unique_ptr<Rank>& rank : ranks_) {
    addresses.push_back(rank->transceiver().control_address());
  }
  return addresses;
}

absl::Status Instance::AddPeer(absl::Span<const std::string> addresses, absl::Time deadline) {
  for (const std::unique_ptr<Rank>& rank : ranks_) {
    // The generation side's peer is the context instance, which it names: with CURVE
    // the handshake is sealed for that instance's key.
    absl::Status added =
        options_.role == Role::kGeneration
            ? rank->transceiver().AddPeerInstance(options_.context_name, addresses, deadline)
            : rank->transceiver().AddPeerInstance(addresses, deadline);
    if (!added.ok()) {
      return absl::Status(added.code(), absl::StrCat("rank ", rank->id(), " of ", options_.name,
                                                     ": ", added.message()));
    }
  }
  return absl::OkStatus();
}

absl::Status Instance::WaitForPeer(absl::Time deadline) {
  for (;;) {
    std::vector<int64_t> waiting;
    for (const std::unique_ptr<Rank>& rank : ranks_) {
      if (rank->transceiver().metrics().handshakes == 0) waiting.push_back(rank->id());
    }
    if (waiting.empty()) return absl::OkStatus();
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "no generation rank shook hands with these ranks: instance=", options_.name,
          " ranks=[", absl::StrJoin(waiting, ","), "]"));
    }
    // The transceiver has no wait for a handshake it did not start; poll gently.
    absl::SleepFor(absl::Milliseconds(10));
  }
}

void Instance::Start(absl::Time deadline, Progress* progress) {
  started_ = absl::Now();
  deadline_ = deadline;
  records_.resize(ranks_.size());
  if (progress != nullptr) {
    int64_t total = 0;
    for (const std::unique_ptr<Rank>& rank : ranks_) {
      for (const RequestPlan& plan : workload_) {
        const int64_t dp = options_.role == Role::kContext ? plan.context_dp_rank
                                                           : plan.generation_dp_rank;
        total += TakesPart(rank->table().topology, dp) ? 1 : 0;
      }
    }
    progress->requests_total.fetch_add(total);
  }
  for (size_t r = 0; r < ranks_.size(); ++r) {
    engines_.emplace_back([this, r, progress] {
      Engine engine(*ranks_[r], options_, workload_, &records_[r], progress, &stop_, deadline_);
      engine.Run();
    });
  }
}

void Instance::Reset(std::vector<RequestPlan> workload) {
  for (std::thread& engine : engines_) {
    if (engine.joinable()) engine.join();
  }
  engines_.clear();
  records_.clear();
  workload_ = std::move(workload);
}

SideReport Instance::Wait() {
  for (std::thread& engine : engines_) {
    if (engine.joinable()) engine.join();
  }
  SideReport report;
  report.seconds = absl::ToDoubleSeconds(absl::Now() - started_);
  report.role = options_.role == Role::kContext ? "context" : "generation";
  report.instance = options_.name;
  report.ranks = static_cast<int64_t>(ranks_.size());
  report.shape = absl::StrCat("TP", options_.shape.tp, " PP", options_.shape.pp,
                              options_.shape.attention_dp ? " DP" : "");
  report.transport = options_.transport.kind;
  for (const std::unique_ptr<Rank>& rank : ranks_) {
    const transceiver::TransceiverMetrics m = rank->transceiver().metrics();
    report.metrics.requests_started += m.requests_started;
    report.metrics.requests_succeeded += m.requests_succeeded;
    report.metrics.requests_failed += m.requests_failed;
    report.metrics.requests_cancelled += m.requests_cancelled;
    report.metrics.bytes += m.bytes;
    report.metrics.writes += m.writes;
    report.metrics.handshakes += m.handshakes;
    report.metrics.fences += m.fences;
    report.metrics.bad_messages += m.bad_messages;
    report.metrics.dropped_messages += m.dropped_messages;
  }
  // Per request, over the ranks that take part.
  absl::flat_hash_map<uint64_t, std::vector<const Record*>> by_request;
  for (size_t r = 0; r < records_.size(); ++r) {
    for (const Record& record : records_[r]) by_request[record.rid].push_back(&record);
  }
  for (const RequestPlan& plan : workload_) {
    int64_t expected = 0;
    for (const std::unique_ptr<Rank>& rank : ranks_) {
      const int64_t dp = options_.role == Role::kContext ? plan.context_dp_rank
                                                         : plan.generation_dp_rank;
      expected += TakesPart(rank->table().topology, dp) ? 1 : 0;
    }
    if (expected == 0) continue;
    ++report.requests;
    const std::vector<const Record*>& records = by_request[plan.rid];
    bool all_success = static_cast<int64_t>(records.size()) == expected;
    bool acceptable = all_success;
    bool mismatch = false;
    bool late = false;
    std::string problem;
    absl::Duration latency;
    for (const Record* record : records) {
      report.bytes += record->metrics.bytes;
      report.writes += record->metrics.writes;
      report.block_pairs += record->metrics.blocks;
      report.block_pairs_skipped += record->metrics.blocks_skipped;
      report.bytes_checked += record->bytes_checked;
      mismatch |= record->mismatch;
      late |= record->late_write;
      latency = std::max(latency, record->metrics.total);
      const bool success = record->finished && record->problem.empty() &&
                           record->state == SessionState::kFullyTransferred;
      // A planned cancel may win: cancelled here, or failed by the peer's cancel.
      const bool cancelled =
          plan.may_be_cancelled() && record->finished && record->problem.empty() &&
          (record->state == SessionState::kCancelled ||
           (record->state == SessionState::kError &&
            record->error.code() == absl::StatusCode::kAborted));
      all_success &= success;
      acceptable &= success || cancelled;
      if (!success && !cancelled && problem.empty()) {
        problem = !record->problem.empty()
                      ? record->problem
                      : absl::StrCat("request=", plan.rid, " ended ",
                                     transfer::SessionStateName(record->state), ": ",
                                     record->error.ToString());
      }
    }
    if (static_cast<int64_t>(records.size()) != expected && problem.empty()) {
      problem = absl::StrCat("request=", plan.rid, " was not started on every rank: started=",
                             records.size(), " expected=", expected);
    }
    report.mismatches += mismatch ? 1 : 0;
    report.late_writes += late ? 1 : 0;
    if (all_success) {
      ++report.succeeded;
      report.latency_ms.push_back(absl::ToDoubleMilliseconds(latency));
      if (options_.role == Role::kGeneration) {
        for (const GroupBlocks& b : GenerationBlocks(options_.model, plan)) {
          report.blocks_sent += b.total - b.first;
          report.blocks_skipped_window += b.stale;
          report.blocks_skipped_reuse += b.first - b.stale;
        }
      }
    } else if (acceptable) {
      ++report.cancelled;
    } else {
      ++report.failed;
      if (report.failures.size() < 20) {
        report.failures.push_back(absl::StrCat(report.role, " request=", plan.rid,
                                               " prompt_len=", plan.prompt_len, " hit=",
                                               plan.hit_tokens, " chunks=", plan.chunks.size(),
                                               " cancel=", CancelWhenName(plan.cancel),
                                               plan.cancel == CancelWhen::kNone ? ""
                                               : plan.cancel_side == Role::kContext ? "/context"
                                                                                    : "/generation",
                                               ": ",
                                               problem));
      }
    }
  }
  return report;
}

absl::Status Instance::CheckAtRest(bool late_request_data) {
  for (const std::unique_ptr<Rank>& rank : ranks_) {
    const std::string where = absl::StrCat("instance=", options_.name, " rank=", rank->id());
    const RankLayout& layout = rank->layout();
    for (size_t g = 0; g < layout.num_groups(); ++g) {
      const int64_t slots = rank->table().pools[layout.pool(g)].num_slots;
      if (const int64_t free = rank->manager().free_slots(g); free != slots) {
        return absl::FailedPreconditionError(absl::StrCat(
            "slots still taken: ", where, " group=", g, " free=", free, " slots=", slots));
      }
      if (options_.role != Role::kGeneration || !options_.check_free_slots) continue;
      for (int64_t slot = 0; slot < slots; ++slot) {
        if (std::optional<RankLayout::Mismatch> m = layout.CheckFree(g, slot, rank->slot(g, slot))) {
          return absl::DataLossError(absl::StrCat("a byte changed where no request was: ", where,
                                                  " group=", g, " slot=", slot, " ", Describe(*m)));
        }
      }
    }
    for (const RequestPlan& plan : workload_) {
      if (rank->transceiver().GetStatus(plan.rid).ok()) {
        return absl::FailedPreconditionError(
            absl::StrCat("request still tracked: ", where, " request=", plan.rid));
      }
    }
    const transceiver::TransceiverMetrics m = rank->transceiver().metrics();
    if ((m.sessions != 0 && !late_request_data) ||
        m.requests_started != m.requests_succeeded + m.requests_failed + m.requests_cancelled) {
      return absl::FailedPreconditionError(absl::StrCat(
          "sessions still held: ", where, " sessions=", m.sessions, " started=",
          m.requests_started, " succeeded=", m.requests_succeeded, " failed=", m.requests_failed,
          " cancelled=", m.requests_cancelled));
    }
  }
  return absl::OkStatus();
}

// --- Progress -------------------------------------------------------------------------

void Progress::Add(bool ok, uint64_t moved) {
  bytes.fetch_add(moved);
  if (!ok) failures.fetch_add(1);
  sync::MutexLock lock(&mu_);
  requests_done.fetch_add(1);
  cv_.SignalAll();
}

bool Progress::WaitForDone(int64_t n, absl::Time deadline) {
  sync::MutexLock lock(&mu_);
  while (requests_done.load() < n) {
    if (cv_.WaitUntil(&lock, deadline)) return requests_done.load() >= n;
  }
  return true;
}

ProgressPrinter::ProgressPrinter(const Progress* progress, std::string label,
                                 absl::Duration interval)
    : progress_(progress),
      label_(std::move(label)),
      start_(absl::Now()),
      terminal_(isatty(STDERR_FILENO) == 1) {
  // A terminal gets a live line; a log gets a line every 20 intervals (5 s).
  const absl::Duration every = terminal_ ? interval : interval * 20;
  thread_ = std::thread([this, every] {
    sync::MutexLock lock(&mu_);
    for (;;) {
      const absl::Time next = absl::Now() + every;
      while (!stop_ && !cv_.WaitUntil(&lock, next)) {
      }
      if (stop_) return;
      Print(false);
    }
  });
}

ProgressPrinter::~ProgressPrinter() {
  {
    sync::MutexLock lock(&mu_);
    stop_ = true;
    cv_.SignalAll();
  }
  thread_.join();
  Print(true);
}

void ProgressPrinter::Print(bool final) {
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start_);
  const uint64_t bytes = progress_->bytes.load();
  const std::string line = absl::StrFormat(
      "%s: %d/%d requests, %d failed, %.2f GB, %.2f GB/s, %.1f s", label_,
      progress_->requests_done.load(), progress_->requests_total.load(),
      progress_->failures.load(), bytes / 1e9, seconds > 0 ? bytes / 1e9 / seconds : 0.0,
      seconds);
  if (terminal_) {
    std::fprintf(stderr, "\r%-100s%s", line.c_str(), final ? "\n" : "");
  } else {
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  std::fflush(stderr);
}

}  // namespace kvx::harness
