// The sides of a soak: an instance reused batch after batch, its faults, its
// resources; and how the driver reaches a side (this process, or a child's pipes).

#include <dirent.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "nlohmann/json.hpp"
#include "sync/mutex.h"
#include "tools/transceiver_harness.h"
#include "tools/transceiver_soak.h"
#include "transfer/transceiver/transceiver.h"
#include "transport/fault_injecting_transport.h"
#include "transport/transport.h"

namespace kvx::harness {

using nlohmann::json;
using sync::MutexLock;

// --- Resources ----------------------------------------------------------------------

absl::StatusOr<ProcessSample> SampleProcess() {
  ProcessSample sample;
  std::ifstream status("/proc/self/status");
  if (!status) return absl::InternalError("cannot read /proc/self/status");
  std::string line;
  const std::pair<absl::string_view, int64_t*> fields[] = {
      {"VmRSS:", &sample.rss_kb}, {"VmHWM:", &sample.hwm_kb}, {"Threads:", &sample.threads}};
  while (std::getline(status, line)) {
    for (const auto& [name, value] : fields) {
      if (!absl::StartsWith(line, name)) continue;
      absl::string_view rest = absl::StripAsciiWhitespace(absl::string_view(line).substr(name.size()));
      if (absl::EndsWith(rest, " kB")) rest.remove_suffix(3);
      if (!absl::SimpleAtoi(rest, value)) {
        return absl::InternalError(absl::StrCat("unexpected line in /proc/self/status: ", line));
      }
    }
  }
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return absl::InternalError("cannot list /proc/self/fd");
  int64_t entries = 0;
  while (const dirent* entry = readdir(dir)) entries += entry->d_name[0] == '.' ? 0 : 1;
  closedir(dir);
  sample.fds = entries - 1;  // the directory's own descriptor
  return sample;
}

CountingTransport::CountingTransport(std::unique_ptr<transport::Transport> inner)
    : inner_(std::move(inner)) {}

CountingTransport::Counts CountingTransport::counts() const {
  MutexLock lock(&mu_);
  Counts counts = faults_;
  counts.regions = static_cast<int64_t>(regions_.size());
  counts.peers = static_cast<int64_t>(peers_.size());
  counts.transfers = static_cast<int64_t>(transfers_.size());
  return counts;
}

absl::StatusOr<transport::RegionId> CountingTransport::RegisterMemory(
    void* base, uint64_t length, transport::MemoryKind kind) {
  absl::StatusOr<transport::RegionId> region = inner_->RegisterMemory(base, length, kind);
  MutexLock lock(&mu_);
  if (region.ok()) regions_.insert(*region);
  return region;
}

absl::Status CountingTransport::DeregisterMemory(transport::RegionId region) {
  absl::Status done = inner_->DeregisterMemory(region);
  MutexLock lock(&mu_);
  if (done.ok()) regions_.erase(region);
  return done;
}

absl::StatusOr<transport::PeerId> CountingTransport::AddPeer(absl::string_view address) {
  absl::StatusOr<transport::PeerId> peer = inner_->AddPeer(address);
  MutexLock lock(&mu_);
  if (peer.ok()) peers_.insert(*peer);
  return peer;
}

absl::Status CountingTransport::RemovePeer(transport::PeerId peer) {
  absl::Status done = inner_->RemovePeer(peer);
  MutexLock lock(&mu_);
  if (done.ok()) peers_.erase(peer);
  return done;
}

void CountingTransport::Saw(const absl::Status& error) {
  // FaultInjectingTransport's messages (transport/fault_injecting_transport.h).
  const absl::string_view message = error.message();
  if (!absl::StartsWith(message, "injected fault:")) return;
  if (absl::StrContains(message, "write failed")) {
    ++faults_.failed_writes;
  } else if (absl::StrContains(message, "delayed")) {
    ++faults_.delayed;
  } else if (absl::StrContains(message, "dropped")) {
    ++faults_.dropped;
  }
}

absl::StatusOr<transport::TransferId> CountingTransport::PostWrites(
    transport::PeerId peer, absl::Span<const transport::WriteOp> writes, absl::Time deadline) {
  absl::StatusOr<transport::TransferId> id = inner_->PostWrites(peer, writes, deadline);
  MutexLock lock(&mu_);
  if (id.ok()) {
    transfers_.insert(*id);
  } else {
    Saw(id.status());
  }
  return id;
}

absl::StatusOr<transport::TransferStatus> CountingTransport::Ended(
    transport::TransferId id, absl::StatusOr<transport::TransferStatus> status) {
  MutexLock lock(&mu_);
  if (status.ok() && status->final() && transfers_.erase(id) > 0) Saw(status->error);
  return status;
}

absl::StatusOr<transport::TransferStatus> CountingTransport::PollTransfer(
    transport::TransferId id) {
  return Ended(id, inner_->PollTransfer(id));
}

absl::StatusOr<transport::TransferStatus> CountingTransport::WaitTransfer(
    transport::TransferId id, absl::Time deadline) {
  return Ended(id, inner_->WaitTransfer(id, deadline));
}

namespace {

// The fields of a SoakSample, once, for both directions of the JSON codec.
template <typename Sample, typename Visit>
void SampleFields(Sample& s, Visit visit) {
  visit("seconds", s.seconds);
  visit("rss_kb", s.process.rss_kb);
  visit("hwm_kb", s.process.hwm_kb);
  visit("fds", s.process.fds);
  visit("threads", s.process.threads);
  visit("regions", s.regions);
  visit("peers", s.peers);
  visit("transfers", s.transfers);
  visit("sessions", s.sessions);
  visit("live_requests", s.live_requests);
  visit("remembered_cancels", s.remembered_cancels);
}

}  // namespace

json ToJson(const SoakSample& sample) {
  json out = json::object();
  SampleFields(sample, [&](const char* name, const auto& value) { out[name] = value; });
  return out;
}

absl::StatusOr<SoakSample> SoakSampleFromJson(const json& in) {
  SoakSample sample;
  if (!in.is_object()) return absl::InvalidArgumentError("soak sample is not a JSON object");
  absl::Status status;
  SampleFields(sample, [&](const char* name, auto& value) {
    auto field = in.find(name);
    if (!status.ok()) return;
    if (field == in.end() || !field->is_number()) {
      status = absl::InvalidArgumentError(
          absl::StrCat("soak sample lacks a number: field=", name));
      return;
    }
    field->get_to(value);
  });
  if (!status.ok()) return status;
  return sample;
}

// --- Sides ----------------------------------------------------------------------------

namespace {

absl::Duration Memory(const RunOptions& options) { return 2 * options.request_timeout; }

}  // namespace

absl::StatusOr<std::unique_ptr<SoakSide>> SoakSide::Create(const RunOptions& options, Role role,
                                                           const SoakOptions& soak) {
  absl::StatusOr<InstanceOptions> instance = SideOptions(options, role);
  if (!instance.ok()) return instance.status();
  auto side = std::unique_ptr<SoakSide>(new SoakSide());
  side->options_ = options;
  side->soak_ = soak;
  side->role_ = role;
  side->created_ = absl::Now();
  const int64_t ranks = instance->shape.ranks();
  side->faulty_.assign(static_cast<size_t>(ranks), nullptr);
  side->counting_.assign(static_cast<size_t>(ranks), nullptr);
  SoakSide* raw = side.get();
  instance->transport.wrap = [raw](std::unique_ptr<transport::Transport> inner, int64_t rank) {
    auto faulty = std::make_unique<transport::FaultInjectingTransport>(std::move(inner));
    raw->faulty_[rank] = faulty.get();
    auto counting = std::make_unique<CountingTransport>(std::move(faulty));
    raw->counting_[rank] = counting.get();
    return std::unique_ptr<transport::Transport>(std::move(counting));
  };
  // What the transceivers keep for a while after a request (ended sessions,
  // cancels) must drain within a soak: long enough for a batch's other side to
  // come (a side waits a request timeout at most), short enough to wait for at
  // the end.
  instance->cancel_memory = Memory(options);
  instance->request_data_ttl = Memory(options);
  // Slots for the longest prompt any batch may draw.
  instance->num_slots = SlotsFor(instance->model, {MakePlan(0, options.workload.max_prompt)},
                                 options.concurrency);
  const bool check_free = instance->check_free_slots && role == Role::kGeneration;
  absl::StatusOr<std::unique_ptr<Instance>> created =
      Instance::Create(*std::move(instance), {});
  if (!created.ok()) return created.status();
  side->instance_ = *std::move(created);
  // Every page of the pools now, so that RSS does not grow as slots are first used.
  // (A generation side that checks free slots filled them already.)
  for (size_t r = 0; r < side->instance_->num_ranks() && !check_free; ++r) {
    Rank& rank = side->instance_->rank(r);
    for (size_t g = 0; g < rank.layout().num_groups(); ++g) {
      const transfer::Pool& pool = rank.table().pools[rank.layout().pool(g)];
      for (int64_t s = 0; s < pool.num_slots; ++s) {
        std::memset(rank.slot(g, s), 0, rank.layout().slot_bytes(g));
      }
    }
  }
  return side;
}

absl::Status SoakSide::Connect(absl::Span<const std::string> context_addresses,
                               absl::Time deadline) {
  if (role_ == Role::kContext) return instance_->WaitForPeer(deadline);
  context_addresses_.assign(context_addresses.begin(), context_addresses.end());
  return instance_->AddPeer(context_addresses, deadline);
}

json SoakSide::Execute(const json& command) {
  if (command.is_object() && command.contains("batch")) {
    absl::StatusOr<SoakBatch> batch = SoakBatchFromJson(command["batch"]);
    if (!batch.ok()) return json{{"error", batch.status().ToString()}};
    return RunBatch(*batch);
  }
  if (command.is_object() && command.contains("drain")) return Drain();
  return json{{"error", absl::StrCat("unknown soak command: ", command.dump())}};
}

SoakSample SoakSide::Sample() const {
  SoakSample sample;
  sample.seconds = absl::ToDoubleSeconds(absl::Now() - created_);
  absl::StatusOr<ProcessSample> process = SampleProcess();
  if (process.ok()) sample.process = *process;
  for (const CountingTransport* counting : counting_) {
    const CountingTransport::Counts counts = counting->counts();
    sample.regions += counts.regions;
    sample.peers += counts.peers;
    sample.transfers += counts.transfers;
  }
  for (size_t r = 0; r < instance_->num_ranks(); ++r) {
    const transceiver::TransceiverMetrics m = instance_->rank(r).transceiver().metrics();
    sample.sessions += m.sessions;
    sample.live_requests += m.live_requests;
    sample.remembered_cancels += m.remembered_cancels;
  }
  return sample;
}

json SoakSide::RunBatch(const SoakBatch& batch) {
  WorkloadOptions workload = options_.workload;
  workload.requests = soak_.batch_requests;
  workload.seed = batch.seed;
  workload.first_rid = batch.first_rid;
  workload.context_dp_size = options_.context.dp_size();
  workload.generation_dp_size = options_.generation.dp_size();
  absl::StatusOr<std::vector<RequestPlan>> plans =
      MakeWorkload(workload, options_.model.tokens_per_block);
  if (!plans.ok()) return json{{"error", plans.status().ToString()}};
  const bool mine = batch.fault != FaultKind::kNone &&
                    role_ == (batch.fault == FaultKind::kReconnect ? Role::kGeneration
                                                                   : Role::kContext);
  if (mine && batch.fault != FaultKind::kReconnect &&
      (batch.fault_rank < 0 || batch.fault_rank >= static_cast<int64_t>(faulty_.size()))) {
    return json{{"error", absl::StrCat("no such context rank to fault: batch=", batch.index,
                                       " rank=", batch.fault_rank)}};
  }
  int64_t before[3] = {};
  for (const CountingTransport* counting : counting_) {
    const CountingTransport::Counts c = counting->counts();
    before[0] += c.failed_writes;
    before[1] += c.delayed;
    before[2] += c.dropped;
  }
  instance_->Reset(*std::move(plans));
  const absl::Time deadline = absl::Now() + soak_.batch_timeout;
  Progress progress;
  int64_t armed = 0;
  if (mine && batch.fault == FaultKind::kWrite) {
    faulty_[batch.fault_rank]->FailNthWrite(batch.fail_write);
    armed = 1;
  }
  std::vector<std::string> problems;
  instance_->Start(deadline, &progress);
  if (mine && batch.fault != FaultKind::kWrite) armed = Inject(batch, progress, deadline, &problems);
  SideReport report = instance_->Wait();
  for (transport::FaultInjectingTransport* faulty : faulty_) faulty->ClearFaults();
  int64_t after[3] = {};
  for (const CountingTransport* counting : counting_) {
    const CountingTransport::Counts c = counting->counts();
    after[0] += c.failed_writes;
    after[1] += c.delayed;
    after[2] += c.dropped;
  }
  report.latency_ms.clear();  // p50 and p99 stay; the driver needs no samples
  json report_json = ToJson(report);
  return json{{"batch", batch.index},
              {"report", std::move(report_json)},
              {"armed", armed},
              {"faulted_transfers",
               {{"write", after[0] - before[0]},
                {"delay", after[1] - before[1]},
                {"drop", after[2] - before[2]}}},
              {"problems", problems},
              {"sample", ToJson(Sample())}};
}

int64_t SoakSide::Inject(const SoakBatch& batch, Progress& progress, absl::Time deadline,
                         std::vector<std::string>* problems) {
  const int64_t total = progress.requests_total.load();
  const int64_t start = static_cast<int64_t>(batch.fault_after * static_cast<double>(total));
  if (!progress.WaitForDone(start, deadline)) return 0;
  if (batch.fault == FaultKind::kReconnect) {
    // The control plane: every rank forgets the context instance (its requests with
    // it fail, its ranks are fenced), then shakes hands with it again.
    for (size_t r = 0; r < instance_->num_ranks(); ++r) {
      absl::Status removed =
          instance_->rank(r).transceiver().RemovePeerInstance(options_.context_name);
      if (!removed.ok()) {
        problems->push_back(absl::StrCat("rank ", r, " could not remove the context instance: ",
                                         removed.ToString()));
      }
    }
    absl::Status added =
        instance_->AddPeer(context_addresses_, std::min(deadline, absl::Now() + absl::Seconds(60)));
    if (!added.ok()) {
      problems->push_back(
          absl::StrCat("the context instance could not be added again: ", added.ToString()));
    }
    return 1;
  }
  transport::FaultInjectingTransport& faulty = *faulty_[batch.fault_rank];
  const CountingTransport& counting = *counting_[batch.fault_rank];
  auto hits = [&counting] {
    const CountingTransport::Counts c = counting.counts();
    return c.delayed + c.dropped;
  };
  const int64_t hits_before = hits();
  if (batch.fault == FaultKind::kDelay) {
    // Past any deadline of a transfer posted now.
    faulty.DelayCompletions(2 * options_.request_timeout + absl::Seconds(1));
  } else {
    faulty.DropAllPeers();
  }
  // Open for fault_window more requests per rank, and longer while no transfer of
  // the faulty rank met the fault yet (a slow machine): else it tested nothing.
  const int64_t ranks = static_cast<int64_t>(instance_->num_ranks());
  int64_t until = start + soak_.fault_window * ranks;
  while (progress.WaitForDone(until, deadline) && hits() == hits_before && until < total) {
    ++until;
  }
  faulty.ClearFaults();
  return 1;
}

json SoakSide::Drain() {
  // Remembered for Memory() after they ended, which takes a request timeout.
  const absl::Time bound =
      absl::Now() + Memory(options_) + 2 * options_.request_timeout + absl::Seconds(5);
  for (;;) {
    const SoakSample sample = Sample();
    const bool drained = sample.sessions == 0 && sample.remembered_cancels == 0 &&
                         sample.live_requests == 0 && sample.transfers == 0;
    if (drained || absl::Now() >= bound) return json{{"drained", drained}, {"sample", ToJson(sample)}};
    // The transceivers let ended sessions and cancels go on their own timers, and
    // tell no one: look again shortly.
    absl::SleepFor(absl::Milliseconds(100));
  }
}

// --- Links ----------------------------------------------------------------------------

InProcessSoakLink::~InProcessSoakLink() {
  if (thread_.joinable()) thread_.join();
}

absl::Status InProcessSoakLink::Send(const json& command) {
  if (thread_.joinable()) thread_.join();  // the previous command, answered
  {
    MutexLock lock(&mu_);
    answer_.reset();
  }
  thread_ = std::thread([this, command] {
    json answer = side_->Execute(command);
    MutexLock lock(&mu_);
    answer_ = std::move(answer);
    cv_.SignalAll();
  });
  return absl::OkStatus();
}

absl::StatusOr<json> InProcessSoakLink::Receive(absl::Time deadline) {
  MutexLock lock(&mu_);
  while (!answer_.has_value()) {
    if (cv_.WaitUntil(&lock, deadline) && !answer_.has_value()) {
      return absl::DeadlineExceededError("soak side did not answer in time");
    }
  }
  json answer = *std::move(answer_);
  answer_.reset();
  return answer;
}

absl::Status ChildSoakLink::Send(const json& command) { return child_->WriteLine(command.dump()); }

absl::StatusOr<json> ChildSoakLink::Receive(absl::Time deadline) {
  absl::StatusOr<std::string> line = child_->ReadLine(deadline);
  if (!line.ok()) return line.status();
  json answer = json::parse(*line, nullptr, /*allow_exceptions=*/false);
  if (answer.is_discarded()) {
    return absl::InternalError(absl::StrCat("soak child answered no JSON: ", *line));
  }
  return answer;
}

void LineQueue::Push(std::string line) {
  MutexLock lock(&mu_);
  lines_.push_back(std::move(line));
  cv_.SignalAll();
}

std::optional<std::string> LineQueue::Pop(absl::Time deadline) {
  MutexLock lock(&mu_);
  while (lines_.empty()) {
    if (cv_.WaitUntil(&lock, deadline) && lines_.empty()) return std::nullopt;
  }
  std::string line = std::move(lines_.front());
  lines_.pop_front();
  return line;
}

}  // namespace kvx::harness
