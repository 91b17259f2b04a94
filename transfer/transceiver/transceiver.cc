#include "transfer/transceiver/transceiver.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <queue>
#include <set>
#include <string>
#include <thread>  // NOLINT(build/c++11)
#include <tuple>
#include <utility>
#include <variant>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "cache_reuse/adapter.h"
#include "kernels/device.h"
#include "kernels/launch.h"
#include "kernels/staging.h"
#include "transfer/control_channel.h"
#include "transfer/fragments.h"
#include "transfer/page_table.h"
#include "transfer/protocol.h"
#include "transfer/session.h"
#include "transfer/slice.h"
#include "transfer/topology.h"
#include "sync/mutex.h"
#include "transport/transport.h"

namespace kvx::transceiver {
namespace {

using sync::CondVar;
using sync::Mutex;
using sync::MutexLock;
using transfer::KVSlice;
using transfer::Message;
using transfer::RankInfo;
using transfer::ReceiverSession;
using transfer::SenderSession;
using transfer::SessionAction;

constexpr size_t kMaxInstanceName = 256;
// Fragments one staged chunk carries at most (a CUDA workspace's capacity).
constexpr size_t kMaxChunkFragments = 65536;

// The slice groups of a table as the slice builder and the pairing see them (one
// source of truth: the page table).
std::vector<cache_reuse::LayerGroupSpec> SliceGroupsOf(const transfer::RankPageTable& table) {
  std::vector<cache_reuse::LayerGroupSpec> groups;
  if (table.slice_groups.empty()) {
    for (const transfer::AttentionGroup& g : table.attention_groups) {
      groups.push_back(g.window.has_value() ? cache_reuse::LayerGroupSpec::Windowed(*g.window)
                                            : cache_reuse::LayerGroupSpec::Full());
    }
    return groups;
  }
  for (int64_t index : table.slice_groups) {
    if (index == transfer::kStateSliceGroup) {
      groups.push_back(cache_reuse::LayerGroupSpec::Mamba());
    } else {
      const transfer::AttentionGroup& g = table.attention_groups[index];
      groups.push_back(g.window.has_value() ? cache_reuse::LayerGroupSpec::Windowed(*g.window)
                                            : cache_reuse::LayerGroupSpec::Full());
    }
  }
  return groups;
}

std::vector<std::optional<int64_t>> WindowsOf(
    absl::Span<const cache_reuse::LayerGroupSpec> groups) {
  std::vector<std::optional<int64_t>> windows;
  for (const cache_reuse::LayerGroupSpec& g : groups) windows.push_back(g.window);
  return windows;
}

int64_t RankOf(const transfer::Topology& t) { return t.pp_rank * t.tp_size + t.tp_rank; }

bool Printable(absl::string_view s) {
  for (char c : s) {
    if (c < 0x20 || c > 0x7e) return false;
  }
  return true;
}

// Two ranks of one instance must describe the same instance.
bool SameShape(const transfer::Topology& a, const transfer::Topology& b) {
  return a.tp_size == b.tp_size && a.pp_size == b.pp_size &&
         a.layers_per_pp_rank == b.layers_per_pp_rank && a.attention_dp == b.attention_dp;
}

// A status deep-copied, so ThreadSanitizer sees no shared reference count across
// threads (transport/internal/mutex.h explains why).
absl::Status Copy(const absl::Status& s) {
  return s.ok() ? absl::OkStatus() : absl::Status(s.code(), std::string(s.message()));
}

}  // namespace

// Everything the rank's thread owns, and the little the engine's threads share
// with it (guarded by mu).
struct Transceiver::Impl {
  // --- Constant after Create.
  TransceiverOptions options;
  transfer::RankPageTable table;
  RankInfo self;
  cache_reuse::CacheReuseAdapter* adapter = nullptr;
  std::vector<cache_reuse::LayerGroupSpec> groups;
  std::vector<std::optional<int64_t>> windows;
  transfer::HeadModel heads;
  int64_t self_dp_rank = 0;
  std::unique_ptr<transport::Transport> transport;
  transport::MemoryKind pool_memory = transport::MemoryKind::kHost;
  bool stage_only = false;  // pools not registered; every pair staged
  std::vector<transport::RegionId> pool_regions;
  std::unique_ptr<transfer::ControlChannel> channel;

  // --- Shared with the engine's threads.
  struct Command {
    enum class Kind { kAddPeers, kRemovePeer, kSend, kReceive, kCancel } kind;
    std::vector<std::string> addresses;
    std::string instance;
    uint64_t rid = 0;
    int64_t slice_id = 0;
    KVSlice slice;
    std::vector<int64_t> aux;
    int64_t prompt_len = 0;
    std::optional<int64_t> state_slot;
    absl::Time deadline;
    std::optional<transfer::ReceiverRequest> receive;
    int64_t context_dp_rank = 0;
    absl::Time created;
  };
  struct HandshakeWait {
    bool done = false;
    absl::Status status;
  };
  mutable Mutex mu;
  CondVar changed;  // results, handshakes, instance readiness
  bool stop ABSL_GUARDED_BY(mu) = false;
  std::vector<Command> commands ABSL_GUARDED_BY(mu);
  std::map<std::string, HandshakeWait> handshakes ABSL_GUARDED_BY(mu);  // by address
  std::map<std::string, std::set<int64_t>> ready_ranks ABSL_GUARDED_BY(mu);
  std::map<std::string, int64_t> instance_sizes ABSL_GUARDED_BY(mu);
  std::map<uint64_t, RequestStatus> live ABSL_GUARDED_BY(mu);
  // Final statuses the engine has not collected yet, and their states by request.
  struct Uncollected {
    std::deque<RequestStatus> statuses;
    absl::flat_hash_map<uint64_t, SessionState> states;
  };
  Uncollected done_context ABSL_GUARDED_BY(mu);
  Uncollected done_generation ABSL_GUARDED_BY(mu);
  TransceiverMetrics metrics ABSL_GUARDED_BY(mu);

  // --- The rank's thread only.
  // Host memory registered for staging, slots back to back: plain for host pools,
  // pinned and mapped for the device (with a kernel workspace per slot) for CUDA
  // pools.
  struct Arena {
    std::unique_ptr<char[]> bytes;
    std::optional<kernels::PinnedHostBuffer> pinned;
    std::vector<std::unique_ptr<kernels::DeviceWorkspace>> workspaces;  // per slot
    char* base = nullptr;
    transport::RegionId region = 0;
    uint64_t slot_bytes = 0;
    uint32_t slots = 0;
    // Receiver side: per slot, the seq of the last chunk taken from it; a chunk at
    // or below it is a repeated or late copy.
    std::vector<uint64_t> taken_seq;
    char* slot(uint32_t i) const { return base + uint64_t{i} * slot_bytes; }
  };
  struct StagedJob;
  // One staged chunk in flight: its write, and the message that follows it.
  struct StagedWrite {
    transport::TransferId id = 0;
    StagedJob* job = nullptr;
    transfer::StagedChunk chunk;
    uint64_t bytes = 0;
    uint64_t grant_epoch = 0;  // the receiver's grants it was posted under
  };
  // Context side, per generation rank that offered staging.
  struct SendStaging {
    transport::RegionDescriptor remote;
    Arena local;
    std::vector<bool> busy;              // until its StagingCredit comes back
    std::vector<uint64_t> seq;           // per slot: the chunk that fills it
    std::deque<StagedJob*> queue;        // jobs with fragments left to stage, FIFO
    std::map<uint32_t, StagedWrite> in_flight;  // by slot
  };
  struct PeerRank {
    RankInfo info;
    transport::PeerId peer = 0;
    // Context side: the grants this rank received from the generation rank.
    bool has_grants = false;
    uint64_t grant_epoch = 0;
    std::vector<transport::RegionDescriptor> grants;
    std::unique_ptr<SendStaging> staging;  // when the generation rank offers it
    // Generation side: the epoch of the grants given to the context rank, and the
    // staging arena it may write (scattered from on StagedChunk).
    uint64_t given_epoch = 0;
    std::unique_ptr<Arena> arena;
    // Context side: plans this rank's writes to the generation rank.
    std::optional<transfer::FragmentPlanner> planner;
  };
  struct PeerInstance {
    std::map<int64_t, PeerRank> ranks;
    transfer::Topology shape;  // of its first rank; all must agree
    // This rank's receivers there, per DP rank of a request: a walk over every
    // rank of the instance (up to 65536), done once per DP rank, not per request.
    std::map<int64_t, absl::StatusOr<std::vector<int64_t>>> receivers_by_dp_rank;
  };
  static constexpr size_t kMaxCachedDpRanks = 256;
  absl::StatusOr<std::vector<int64_t>> ReceiversOf(PeerInstance& instance, int64_t dp_rank);
  std::map<std::string, PeerInstance> instances;
  std::map<std::string, std::pair<std::string, int64_t>> by_address;  // -> (instance, rank)

  struct InFlight {
    transport::TransferId id = 0;
    uint64_t bytes = 0;
    int64_t writes = 0;
  };
  // One (slice, receiver) pair sent in staging mode: its fragments go out in chunks,
  // one write per chunk, as slots free up.
  struct StagedJob {
    uint64_t rid = 0;
    int64_t slice_id = 0;
    int64_t receiver = 0;
    std::vector<transfer::Fragment> fragments;
    size_t next = 0;            // first fragment not fully staged
    uint64_t next_offset = 0;   // bytes of it already staged
    int64_t in_flight = 0;      // chunks posted and not ended
    int64_t chunks = 0;         // chunks delivered
    uint64_t bytes = 0;         // delivered
    absl::Status error;         // the first failure; stops staging
    // A chunk's write failed unsettled: bytes may still land in the receiver's
    // slot, so the pair is reported unsettled and the receiver fences this rank.
    bool unsettled = false;
    bool done() const { return next == fragments.size(); }
  };
  struct SenderEntry {
    explicit SenderEntry(uint64_t rid, int64_t rank) : session(rid, rank) {}
    SenderSession session;
    std::string instance;  // the generation instance, from the first request data
    bool has_task = false;
    int64_t prompt_len = 0;
    std::optional<int64_t> state_slot;
    std::map<std::pair<int64_t, int64_t>, InFlight> in_flight;
    std::map<std::pair<int64_t, int64_t>, std::unique_ptr<StagedJob>> staged;
    RequestMetrics metrics;
    absl::Time started;
    std::optional<absl::Time> first_post;
    // Set when it ended before the engine's task came: forgotten after this.
    std::optional<absl::Time> unclaimed_until;
  };
  struct ReceiverEntry {
    explicit ReceiverEntry(transfer::ReceiverRequest request) : session(std::move(request)) {}
    ReceiverSession session;
    std::string instance;
    RequestMetrics metrics;
    absl::Time started;
    absl::Time timer = absl::InfiniteFuture();  // the deadline last put in `timers`
    // Staged chunks scattered per (slice, sender rank), and a sender's SUCCESS held
    // until they are all in: control messages may come in any order.
    std::map<std::pair<int64_t, int64_t>, int64_t> scattered;
    std::map<std::pair<int64_t, int64_t>, transfer::SliceResult> held;
  };
  std::map<uint64_t, std::unique_ptr<SenderEntry>> senders;
  std::map<uint64_t, std::unique_ptr<ReceiverEntry>> receivers;
  std::map<uint64_t, absl::Time> cancelled_early;  // rid -> forget after
  // (sessions, remembered cancels) as last put in `metrics` (its gauges).
  std::pair<int64_t, int64_t> published_gauges{0, 0};
  // Grant epochs increase for the rank's whole life, also across a peer instance
  // removed and added again, so a context rank never mistakes new grants for old.
  uint64_t last_epoch = 0;
  // Staged chunks are numbered over the rank's whole life too (StagedChunk::seq).
  uint64_t last_chunk_seq = 0;
  std::set<uint64_t> touched;
  // Staging arenas of ranks that are gone, freed once the transport has released
  // them (a transfer that read one may end after its peer was removed).
  std::vector<std::unique_ptr<Arena>> retired;
  std::set<uint64_t> posting;  // senders with transfers in flight
  // (when, rid) of session deadlines, checked lazily.
  std::priority_queue<std::pair<absl::Time, uint64_t>, std::vector<std::pair<absl::Time, uint64_t>>,
                      std::greater<>>
      timers;
  // Reused across requests (the hot path allocates little once warm).
  std::vector<transfer::GroupPairing> pairs;
  transfer::FragmentPlan plan;
  std::vector<transport::WriteOp> ops;

  std::thread thread;

  void Run();
  void Execute(Command& command);
  void Handle(const transfer::ControlChannel::Incoming& incoming);
  // With CURVE: the instance a message claims is the one its sender's key proved.
  absl::Status CheckSenderInstance(const transfer::ControlChannel::Incoming& incoming,
                                   const Message& message);
  void HandleRankInfo(const std::string& from, const RankInfo& info, bool is_request,
                      const transfer::RankInfoReply* reply);
  void HandleRequestData(const std::string& from, const transfer::RequestData& data);
  void HandleResult(const std::string& from, const transfer::SliceResult& result);
  void HandleAux(const std::string& from, const transfer::AuxTokens& aux);
  void HandleCancel(const std::string& from, const transfer::Cancel& cancel);
  // Messages go to the ranks of `instance_name` (empty: the request's instance).
  void RunSender(SenderEntry& e, std::vector<SessionAction> actions,
                 const std::string& instance_name = "");
  void RunReceiver(ReceiverEntry& e, std::vector<SessionAction> actions);
  void PlanAndPost(SenderEntry& e, int64_t slice_id, int64_t receiver,
                   std::vector<SessionAction>* out);
  void PollTransfers();
  void Shutdown();
  // Staging mode (issue 10): gather a pair's small writes into slots, one write per
  // slot, the receiver scatters.
  void StageJob(SenderEntry& e, PeerRank& peer, int64_t slice_id, int64_t receiver);
  void PumpStaging(PeerRank& peer);
  void PollStaging();
  void EndStagedJob(StagedJob& job);
  // Ends each of `jobs` still owned by its sender. Ending one runs its session,
  // which may end (and free) others of the list first: they are found again by key.
  void EndStagedJobs(const std::vector<StagedJob*>& jobs);
  void RetireArenas();
  absl::StatusOr<std::unique_ptr<Arena>> MakeArena(uint64_t slot_bytes, uint32_t slots);
  kernels::Launch LaunchFor(const Arena& arena, uint32_t slot) const;
  void HandleStagedChunk(const std::string& from, const transfer::StagedChunk& chunk);
  void FailReceiver(ReceiverEntry& e, absl::Status why);
  void HandleStagingCredit(const std::string& from, const transfer::StagingCredit& credit);
  std::optional<transfer::StagingGrant> OfferStaging(PeerRank& rank);
  void FireTimers(absl::Time now);
  void Fence(const std::string& instance, int64_t rank);
  void DropInstance(const std::string& instance, const absl::Status& why);
  void Publish();
  void Send(const std::string& address, const Message& message);
  std::vector<transfer::PoolGrant> GrantAll(PeerRank& rank);
  SenderEntry& Sender(uint64_t rid);
  PeerRank* FindRank(const std::string& from, int64_t claimed_rank);
  void FinishHandshake(const std::string& address, absl::Status status);
  void MarkReady(const std::string& instance, int64_t rank);
  void CountBad(absl::string_view what);
  void Log(absl::string_view what);
  RequestStatus StatusOf(const SenderEntry& e) const;
  RequestStatus StatusOf(const ReceiverEntry& e) const;
};

// --- Create and the engine-facing methods --------------------------------------------

absl::StatusOr<std::unique_ptr<Transceiver>> Transceiver::Create(const TransceiverOptions& options,
                                                                 RankSetup setup) {
  if (options.instance.empty() || options.instance.size() > kMaxInstanceName ||
      !Printable(options.instance)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "instance name must be 1..256 printable bytes: size=", options.instance.size()));
  }
  if (setup.adapter == nullptr) return absl::InvalidArgumentError("RankSetup.adapter is null");
  if (!setup.create_transport) {
    return absl::InvalidArgumentError("RankSetup.create_transport is empty");
  }
  absl::Status valid = transfer::ValidatePageTable(setup.page_table);
  if (!valid.ok()) return valid;
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->table = std::move(setup.page_table);
  impl->adapter = setup.adapter;
  impl->groups = SliceGroupsOf(impl->table);
  impl->windows = WindowsOf(impl->groups);
  impl->heads = transfer::HeadModel{impl->table.num_kv_heads, impl->table.is_mla};
  const transfer::Topology& topology = impl->table.topology;
  impl->self_dp_rank = topology.attention_dp ? topology.tp_rank : 0;
  impl->pool_memory = setup.pool_memory;

  transfer::ControlChannelOptions channel_options;
  channel_options.bind_address = options.control_bind;
  channel_options.security = options.control_security;
  absl::StatusOr<std::unique_ptr<transfer::ControlChannel>> channel =
      transfer::ControlChannel::Create(channel_options);
  if (!channel.ok()) return channel.status();
  impl->channel = *std::move(channel);
  transport::EndpointOptions endpoint = setup.endpoint;
  transfer::ControlChannel* wake = impl->channel.get();
  endpoint.on_transfer_update = [wake] { wake->Wake(); };
  absl::StatusOr<std::unique_ptr<transport::Transport>> created = setup.create_transport(endpoint);
  if (!created.ok()) return created.status();
  impl->transport = *std::move(created);
  impl->stage_only = options.staging.only;
  if (setup.pool_memory == transport::MemoryKind::kCuda) {
    if (impl->transport->capabilities().cuda_memory) {
      impl->Log("CUDA pools: the transport registers device memory (FI_HMEM): writes go "
                "from GPU to GPU");
    } else {
      impl->stage_only = true;
      impl->Log(absl::StrCat(
          "CUDA pools: the transport (", impl->transport->capabilities().backend,
          ") cannot register device memory (no FI_HMEM / GPUDirect RDMA): every write is "
          "staged through pinned host memory"));
    }
  }
  if (impl->stage_only && (options.staging.slots == 0 || options.staging.slot_bytes == 0)) {
    return absl::InvalidArgumentError(
        "every write must be staged (staging.only, or CUDA pools without FI_HMEM) but "
        "staging has no slots");
  }
  // Pools are registered (and later granted) only when peers write them directly.
  for (size_t i = 0; !impl->stage_only && i < impl->table.pools.size(); ++i) {
    const transfer::Pool& pool = impl->table.pools[i];
    absl::StatusOr<transport::RegionId> region = impl->transport->RegisterMemory(
        reinterpret_cast<void*>(pool.base_address), pool.slot_bytes * static_cast<uint64_t>(pool.num_slots),
        setup.pool_memory);
    if (!region.ok()) {
      return absl::Status(region.status().code(),
                          absl::StrCat("registering pool ", i, ": ", region.status().message()));
    }
    impl->pool_regions.push_back(*region);
  }
  impl->self.instance = options.instance;
  impl->self.role = options.role;
  impl->self.rank = RankOf(topology);
  impl->self.control_address = impl->channel->address();
  impl->self.transport_address = impl->transport->address();
  impl->self.page_table = impl->table;
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->Run(); });
  return std::unique_ptr<Transceiver>(new Transceiver(std::move(impl)));
}

Transceiver::Transceiver(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Transceiver::~Transceiver() {
  {
    MutexLock lock(&impl_->mu);
    impl_->stop = true;
  }
  impl_->channel->Wake();
  if (impl_->thread.joinable()) impl_->thread.join();
  // The transport's destructor ends whatever is still in flight before the pools
  // it writes from or into can go away.
  impl_->transport.reset();
}

const std::string& Transceiver::control_address() const { return impl_->self.control_address; }
const RankInfo& Transceiver::rank_info() const { return impl_->self; }

absl::Status Transceiver::AddPeerInstance(absl::Span<const std::string> control_addresses,
                                          absl::Time deadline) {
  return AddPeerInstance("", control_addresses, deadline);
}

absl::Status Transceiver::AddPeerInstance(absl::string_view instance,
                                          absl::Span<const std::string> control_addresses,
                                          absl::Time deadline) {
  if (control_addresses.empty()) {
    return absl::InvalidArgumentError("AddPeerInstance needs the control address of every rank");
  }
  if (instance.empty() &&
      impl_->options.control_security.mode != transfer::ControlSecurity::Mode::kOff) {
    // The handshake must be sealed for some instance's key before it is sent.
    return absl::InvalidArgumentError(
        "with CURVE, AddPeerInstance must name the peer instance it adds");
  }
  Impl::Command command;
  command.kind = Impl::Command::Kind::kAddPeers;
  command.instance = std::string(instance);
  command.addresses.assign(control_addresses.begin(), control_addresses.end());
  {
    MutexLock lock(&impl_->mu);
    for (const std::string& address : command.addresses) {
      impl_->handshakes[address] = Impl::HandshakeWait{};
    }
    impl_->commands.push_back(std::move(command));
  }
  impl_->channel->Wake();
  MutexLock lock(&impl_->mu);
  for (;;) {
    std::vector<std::string> missing;
    for (const std::string& address : control_addresses) {
      const Impl::HandshakeWait& wait = impl_->handshakes[address];
      if (!wait.done) {
        missing.push_back(address);
      } else if (!wait.status.ok()) {
        return Copy(wait.status);
      }
    }
    if (missing.empty()) return absl::OkStatus();
    if (impl_->changed.WaitUntil(&lock, deadline)) {
      return absl::UnavailableError(absl::StrCat(
          "peer ranks did not complete the handshake by the deadline: instance=",
          impl_->self.instance, " missing=[", absl::StrJoin(missing, ","), "]"));
    }
  }
}

absl::Status Transceiver::RemovePeerInstance(absl::string_view instance) {
  {
    MutexLock lock(&impl_->mu);
    if (impl_->instance_sizes.count(std::string(instance)) == 0) {
      return absl::NotFoundError(absl::StrCat("no such peer instance: instance=", instance));
    }
    Impl::Command command;
    command.kind = Impl::Command::Kind::kRemovePeer;
    command.instance = std::string(instance);
    impl_->commands.push_back(std::move(command));
  }
  impl_->channel->Wake();
  return absl::OkStatus();
}

absl::Status Transceiver::RespondAndSendAsync(const ContextRequest& request) {
  if (impl_->self.role != Role::kContext) {
    return absl::FailedPreconditionError("RespondAndSendAsync on a generation rank");
  }
  if (request.prompt_len <= 0 || request.slice_id < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "request needs a positive prompt length and slice id >= 0: request=", request.unique_rid,
        " prompt_len=", request.prompt_len, " slice=", request.slice_id));
  }
  cache_reuse::SliceRequest slice_request;
  slice_request.request_id = static_cast<int64_t>(request.unique_rid);
  slice_request.prompt_len = request.prompt_len;
  slice_request.tokens_per_block = impl_->table.tokens_per_block;
  slice_request.side = cache_reuse::Side::kContext;
  slice_request.token_range = request.token_range;
  absl::StatusOr<cache_reuse::BuiltSlice> built =
      cache_reuse::BuildSlice(*impl_->adapter, slice_request, impl_->groups);
  if (!built.ok()) return built.status();
  const absl::Time now = absl::Now();
  Impl::Command command;
  command.kind = Impl::Command::Kind::kSend;
  command.rid = request.unique_rid;
  command.slice_id = request.slice_id;
  command.slice = std::move(built->slice);
  command.aux = request.aux_tokens;
  command.prompt_len = request.prompt_len;
  command.state_slot = request.state_slot;
  command.deadline = now + request.timeout.value_or(impl_->options.default_request_timeout);
  command.created = now;
  {
    MutexLock lock(&impl_->mu);
    // A later slice of a request that ended: its final status waits for the engine.
    // Taken, it would open a second session for the request and a second final
    // status that an engine done with the request never collects.
    if (auto ended = impl_->done_context.states.find(request.unique_rid);
        ended != impl_->done_context.states.end()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "request already ended: request=", request.unique_rid, " slice=", request.slice_id,
          " state=", transfer::SessionStateName(ended->second)));
    }
    if (impl_->live.count(request.unique_rid) == 0 &&
        impl_->live.size() >= impl_->options.max_requests) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "too many requests in flight: requests=", impl_->live.size(),
          " max_requests=", impl_->options.max_requests));
    }
    RequestStatus& status = impl_->live[request.unique_rid];
    status.unique_rid = request.unique_rid;
    status.role = Role::kContext;
    impl_->metrics.requests_started += request.slice_id == 0 ? 1 : 0;
    impl_->commands.push_back(std::move(command));
  }
  impl_->channel->Wake();
  return absl::OkStatus();
}

absl::Status Transceiver::RequestAndReceiveAsync(const GenerationRequest& request) {
  if (impl_->self.role != Role::kGeneration) {
    return absl::FailedPreconditionError("RequestAndReceiveAsync on a context rank");
  }
  if (request.prompt_len <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("request needs a positive prompt length: request=",
                                                   request.unique_rid,
                                                   " prompt_len=", request.prompt_len));
  }
  std::vector<transfer::TokenRange> ranges = request.slices;
  if (ranges.empty()) ranges.push_back(transfer::TokenRange::Create(0, request.prompt_len).value());
  // The slices split [0, prompt_len) in prompt order.
  for (size_t i = 0; i < ranges.size(); ++i) {
    const int64_t expected_start = i == 0 ? 0 : ranges[i - 1].end();
    if (ranges[i].start() != expected_start ||
        (i + 1 == ranges.size() && ranges[i].end() != request.prompt_len)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "slices must split [0, prompt_len) in order: request=", request.unique_rid,
          " slice=", i, " start=", ranges[i].start(), " end=", ranges[i].end(),
          " prompt_len=", request.prompt_len));
    }
  }
  transfer::ReceiverRequest receive;
  receive.unique_rid = request.unique_rid;
  receive.self_rank = impl_->self.rank;
  receive.prompt_len = request.prompt_len;
  receive.dp_rank = impl_->self_dp_rank;
  receive.aux_slot = request.aux_slot;
  receive.state_slot = request.state_slot;
  receive.report_grace = impl_->options.report_grace;
  for (size_t i = 0; i < ranges.size(); ++i) {
    cache_reuse::SliceRequest slice_request;
    slice_request.request_id = static_cast<int64_t>(request.unique_rid);
    slice_request.prompt_len = request.prompt_len;
    slice_request.tokens_per_block = impl_->table.tokens_per_block;
    slice_request.side = cache_reuse::Side::kGeneration;
    slice_request.generation_only = request.generation_only;
    slice_request.token_range = ranges[i];
    absl::StatusOr<cache_reuse::BuiltSlice> built =
        cache_reuse::BuildSlice(*impl_->adapter, slice_request, impl_->groups);
    if (!built.ok()) return built.status();
    transfer::ReceiverSlice slice;
    slice.slice_id = static_cast<int64_t>(i);
    slice.slice = std::move(built->slice);
    // A chunk's earlier blocks came with the earlier chunks: its lists keep only the
    // block holding its first token (completed only now) and those after it. A
    // shorter list starts later (the suffix invariant), so the pairing follows.
    const int64_t first_block = ranges[i].start() / impl_->table.tokens_per_block;
    const int64_t total = transfer::CeilDiv(ranges[i].end(), impl_->table.tokens_per_block);
    for (transfer::BlockList& list : slice.slice.block_ids_per_layer_group) {
      const int64_t list_start = total - static_cast<int64_t>(list.size());
      if (first_block > list_start) {
        list.erase(list.begin(), list.begin() + std::min<int64_t>(first_block - list_start,
                                                                  static_cast<int64_t>(list.size())));
      }
    }
    receive.slices.push_back(std::move(slice));
  }
  const absl::Time now = absl::Now();
  receive.deadline = now + request.timeout.value_or(impl_->options.default_request_timeout);
  Impl::Command command;
  command.kind = Impl::Command::Kind::kReceive;
  command.rid = request.unique_rid;
  command.instance = request.context_instance;
  command.context_dp_rank = request.context_dp_rank;
  command.receive = std::move(receive);
  command.created = now;
  {
    MutexLock lock(&impl_->mu);
    auto size = impl_->instance_sizes.find(request.context_instance);
    if (size == impl_->instance_sizes.end() ||
        static_cast<int64_t>(impl_->ready_ranks[request.context_instance].size()) != size->second) {
      return absl::FailedPreconditionError(absl::StrCat(
          "context instance is not added (AddPeerInstance) or not every rank finished its "
          "handshake: instance=", request.context_instance, " request=", request.unique_rid));
    }
    if (impl_->live.count(request.unique_rid) > 0) {
      return absl::AlreadyExistsError(
          absl::StrCat("request already in flight: request=", request.unique_rid));
    }
    if (impl_->live.size() >= impl_->options.max_requests) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "too many requests in flight: requests=", impl_->live.size(),
          " max_requests=", impl_->options.max_requests));
    }
    RequestStatus& status = impl_->live[request.unique_rid];
    status.unique_rid = request.unique_rid;
    status.role = Role::kGeneration;
    ++impl_->metrics.requests_started;
    impl_->commands.push_back(std::move(command));
  }
  impl_->channel->Wake();
  return absl::OkStatus();
}

namespace {

std::vector<RequestStatus> Collect(sync::Mutex* mu, sync::CondVar* changed,
                                   Transceiver::Impl::Uncollected* done, size_t at_least,
                                   absl::Time deadline) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  MutexLock lock(mu);
  while (done->statuses.size() < at_least && !changed->WaitUntil(&lock, deadline)) {
  }
  std::vector<RequestStatus> out(std::make_move_iterator(done->statuses.begin()),
                                 std::make_move_iterator(done->statuses.end()));
  done->statuses.clear();
  done->states.clear();
  return out;
}

}  // namespace

std::vector<RequestStatus> Transceiver::CheckContextTransferStatus(size_t at_least,
                                                                   absl::Time deadline) {
  return Collect(&impl_->mu, &impl_->changed, &impl_->done_context, at_least, deadline);
}

std::vector<RequestStatus> Transceiver::CheckGenTransferStatus(size_t at_least,
                                                               absl::Time deadline) {
  std::vector<RequestStatus> done =
      Collect(&impl_->mu, &impl_->changed, &impl_->done_generation, at_least, deadline);
  // SEMANTICS.md section 3: the whole prompt is here; hand it to the cache for reuse,
  // on the engine's thread, which owns the cache manager.
  for (RequestStatus& status : done) {
    if (status.state == SessionState::kFullyTransferred) {
      status.commit = impl_->adapter->CommitReceivedBlocks(static_cast<int64_t>(status.unique_rid));
    }
  }
  return done;
}

absl::StatusOr<RequestStatus> Transceiver::GetStatus(uint64_t unique_rid) const {
  MutexLock lock(&impl_->mu);
  auto it = impl_->live.find(unique_rid);
  if (it == impl_->live.end()) {
    return absl::NotFoundError(absl::StrCat("no such request in flight: request=", unique_rid));
  }
  RequestStatus status = it->second;
  status.error = Copy(status.error);
  return status;
}

absl::Status Transceiver::CancelRequest(uint64_t unique_rid) {
  Impl::Command command;
  command.kind = Impl::Command::Kind::kCancel;
  command.rid = unique_rid;
  {
    MutexLock lock(&impl_->mu);
    impl_->commands.push_back(std::move(command));
  }
  impl_->channel->Wake();
  return absl::OkStatus();
}

TransceiverMetrics Transceiver::metrics() const {
  MutexLock lock(&impl_->mu);
  TransceiverMetrics metrics = impl_->metrics;
  metrics.live_requests = static_cast<int64_t>(
      impl_->live.size() + impl_->done_context.statuses.size() +
      impl_->done_generation.statuses.size());
  return metrics;
}

// --- The rank's thread -----------------------------------------------------------------

void Transceiver::Impl::Run() {
  std::vector<transfer::ControlChannel::Incoming> incoming;
  std::vector<Command> todo;
  for (;;) {
    absl::Time wake = absl::Now() + absl::Milliseconds(100);
    if (!timers.empty()) wake = std::min(wake, timers.top().first);
    incoming.clear();
    absl::Status polled = channel->Poll(wake, &incoming);
    if (!polled.ok()) Log(polled.ToString());
    {
      MutexLock lock(&mu);
      if (stop) break;
      todo.swap(commands);
    }

    for (Command& command : todo) Execute(command);
    todo.clear();
    for (const transfer::ControlChannel::Incoming& message : incoming) Handle(message);
    PollTransfers();
    PollStaging();
    RetireArenas();
    FireTimers(absl::Now());
    Publish();
  }
  Shutdown();
}

// Tells every peer of a request that is not final that this rank is going away, so
// none waits for its deadline: receivers stop waiting (Cancel), and a sender's pairs
// in flight are reported FAILED and unsettled (the transport is about to cut them;
// the receiver fences this rank before it reuses their pages).
void Transceiver::Impl::Shutdown() {
  const std::string reason = absl::StrCat("rank shutting down: ", self.instance, "/", self.rank);
  for (auto& [rid, e] : senders) {
    if (transfer::IsFinal(e->session.state()) || e->instance.empty()) continue;
    const PeerInstance& instance = instances[e->instance];
    std::vector<SessionAction> actions;
    e->session.Fail(absl::AbortedError(reason), &actions);
    for (const SessionAction& action : actions) {
      if (const auto* send = std::get_if<transfer::SendMessage>(&action)) {
        auto rank = instance.ranks.find(send->peer_rank);
        if (rank != instance.ranks.end()) Send(rank->second.info.control_address, send->message);
      }
    }
    std::set<std::pair<int64_t, int64_t>> posted;
    for (const auto& [key, flight] : e->in_flight) posted.insert(key);
    for (const auto& [key, job] : e->staged) posted.insert(key);
    for (const auto& [slice_id, receiver] : posted) {
      transfer::SliceResult failed;
      failed.unique_rid = rid;
      failed.slice_id = slice_id;
      failed.sender_rank = self.rank;
      failed.outcome = transfer::SliceOutcome::kFailed;
      failed.code = static_cast<int32_t>(absl::StatusCode::kAborted);
      failed.reason = reason;
      failed.settled = false;
      auto rank = instance.ranks.find(receiver);
      if (rank != instance.ranks.end()) Send(rank->second.info.control_address, failed);
    }
  }
  for (auto& [rid, e] : receivers) {
    if (transfer::IsFinal(e->session.state())) continue;
    const PeerInstance& instance = instances[e->instance];
    for (const auto& [rank_id, peer] : instance.ranks) {
      if (!e->session.waits_on(rank_id)) continue;
      Send(peer.info.control_address,
           transfer::Cancel{rid, self.rank, Role::kGeneration, reason});
    }
  }
}

void Transceiver::Impl::Log(absl::string_view what) {
  std::fprintf(stderr, "kvx transceiver %s/%lld: %.*s\n", self.instance.c_str(),
               static_cast<long long>(self.rank), static_cast<int>(what.size()), what.data());
}

void Transceiver::Impl::CountBad(absl::string_view what) {
  int64_t bad = 0;
  {
    MutexLock lock(&mu);
    bad = ++metrics.bad_messages;
  }
  // One line per power of two, so a flood cannot flood the log.
  if ((bad & (bad - 1)) == 0) Log(absl::StrCat("bad message (", bad, " so far): ", what));
}

void Transceiver::Impl::Send(const std::string& address, const Message& message) {
  absl::Status sent = channel->Send(address, transfer::EncodeMessage(message));
  if (!sent.ok()) {
    Log(absl::StrCat("cannot send ", transfer::MessageKindName(message), " to ", address, ": ",
                     sent.ToString()));
  }
}

void Transceiver::Impl::Execute(Command& command) {
  switch (command.kind) {
    case Command::Kind::kAddPeers: {
      // Always asked afresh, even for a known address: the answer tells whether the
      // rank there restarted (a new transport address) since.
      transfer::RankInfoRequest hello{self};
      for (const std::string& address : command.addresses) {
        // With CURVE, only `command.instance` can accept what is sent there (and an
        // address already known as another instance is refused here).
        if (absl::Status tied = channel->SetPeerInstance(address, command.instance); !tied.ok()) {
          FinishHandshake(address, tied);
          continue;
        }
        Send(address, hello);
      }
      return;
    }
    case Command::Kind::kRemovePeer:
      DropInstance(command.instance,
                   absl::UnavailableError(absl::StrCat("peer instance removed: instance=",
                                                       command.instance)));
      return;
    case Command::Kind::kSend: {
      SenderEntry& e = Sender(command.rid);
      if (!e.has_task) {
        e.has_task = true;
        e.prompt_len = command.prompt_len;
        e.state_slot = command.state_slot;
        e.started = command.created;
      }
      std::vector<SessionAction> actions;
      if (e.prompt_len != command.prompt_len) {
        e.session.Fail(absl::InvalidArgumentError(absl::StrCat(
                           "slices of one request disagree on the prompt length: request=",
                           command.rid, " prompt_len=", e.prompt_len, " vs ",
                           command.prompt_len)),
                       &actions);
      } else {
        absl::Status added = e.session.AddSlice(command.slice_id, std::move(command.slice),
                                                std::move(command.aux), command.deadline, &actions);
        if (!added.ok()) Log(added.ToString());
        timers.emplace(command.deadline, command.rid);
      }
      RunSender(e, std::move(actions));
      return;
    }
    case Command::Kind::kReceive: {
      const uint64_t rid = command.rid;
      auto entry = std::make_unique<ReceiverEntry>(*std::move(command.receive));
      entry->instance = command.instance;
      entry->started = command.created;
      ReceiverEntry& e = *entry;
      receivers[rid] = std::move(entry);
      touched.insert(rid);
      std::vector<SessionAction> actions;
      const absl::Time now = absl::Now();
      auto cancelled = cancelled_early.find(rid);
      auto instance = instances.find(e.instance);
      std::map<int64_t, uint64_t> epochs;
      absl::Status problem;
      if (instance != instances.end()) {
        for (const auto& [rank, peer] : instance->second.ranks) {
          absl::StatusOr<transfer::RankLink> link =
              transfer::LinkRanks(peer.info.page_table.topology, table.topology, heads,
                                  command.context_dp_rank, self_dp_rank);
          if (!link.ok()) {
            problem = link.status();
            break;
          }
          if (link->overlaps) epochs[rank] = peer.given_epoch;
        }
      }
      if (instance == instances.end() || (problem.ok() && epochs.empty())) {
        problem = absl::UnavailableError(absl::StrCat(
            "no rank of the context instance overlaps this one: instance=", e.instance,
            " request=", rid));
      }
      if (!problem.ok()) {
        e.session.Fail(problem, now, &actions);
      } else {
        e.session.Start(epochs, &actions);
        if (cancelled != cancelled_early.end()) {
          e.session.Cancel("cancelled before the request started", now, &actions);
          cancelled_early.erase(cancelled);
        }
      }
      RunReceiver(e, std::move(actions));
      return;
    }
    case Command::Kind::kCancel: {
      const absl::Time now = absl::Now();
      std::vector<SessionAction> actions;
      if (auto s = senders.find(command.rid); s != senders.end()) {
        // Tell the receivers that asked; they stop waiting.
        s->second->session.Cancel("cancelled by the context engine", &actions);
        RunSender(*s->second, std::move(actions));
      } else if (auto r = receivers.find(command.rid); r != receivers.end()) {
        r->second->session.Cancel("cancelled by the generation engine", now, &actions);
        RunReceiver(*r->second, std::move(actions));
      } else {
        cancelled_early[command.rid] = now + options.cancel_memory;
        timers.emplace(now + options.cancel_memory, command.rid);
      }
      return;
    }
  }
}

Transceiver::Impl::SenderEntry& Transceiver::Impl::Sender(uint64_t rid) {
  auto it = senders.find(rid);
  if (it != senders.end()) return *it->second;
  auto entry = std::make_unique<SenderEntry>(rid, self.rank);
  entry->started = absl::Now();
  SenderEntry& e = *entry;
  senders[rid] = std::move(entry);
  touched.insert(rid);
  // Request data that waits for the engine's task waits only so long.
  timers.emplace(e.started + options.request_data_ttl, rid);
  if (cancelled_early.count(rid) > 0) {
    // The cancel stays remembered until it expires: a task or request data that
    // comes later ends cancelled the same way, and this entry need not wait for it.
    std::vector<SessionAction> actions;
    e.session.Cancel("cancelled before this rank saw the request", &actions);
  }
  return e;
}

void Transceiver::Impl::Handle(const transfer::ControlChannel::Incoming& incoming) {
  absl::StatusOr<Message> decoded = transfer::DecodeMessage(incoming.bytes);
  if (!decoded.ok()) {
    CountBad(absl::StrCat("from ", incoming.from, ": ", decoded.status().ToString()));
    return;
  }
  if (absl::Status proven = CheckSenderInstance(incoming, *decoded); !proven.ok()) {
    CountBad(proven.message());
    return;
  }
  if (auto* m = std::get_if<transfer::RankInfoRequest>(&*decoded)) {
    HandleRankInfo(incoming.from, m->sender, /*is_request=*/true, nullptr);
  } else if (auto* m = std::get_if<transfer::RankInfoReply>(&*decoded)) {
    HandleRankInfo(incoming.from, m->sender, /*is_request=*/false, m);
  } else if (auto* m = std::get_if<transfer::RequestData>(&*decoded)) {
    HandleRequestData(incoming.from, *m);
  } else if (auto* m = std::get_if<transfer::SliceResult>(&*decoded)) {
    HandleResult(incoming.from, *m);
  } else if (auto* m = std::get_if<transfer::AuxTokens>(&*decoded)) {
    HandleAux(incoming.from, *m);
  } else if (auto* m = std::get_if<transfer::Cancel>(&*decoded)) {
    HandleCancel(incoming.from, *m);
  } else if (auto* m = std::get_if<transfer::StagedChunk>(&*decoded)) {
    HandleStagedChunk(incoming.from, *m);
  } else if (auto* m = std::get_if<transfer::StagingCredit>(&*decoded)) {
    HandleStagingCredit(incoming.from, *m);
  }
}

absl::Status Transceiver::Impl::CheckSenderInstance(
    const transfer::ControlChannel::Incoming& incoming, const Message& message) {
  // Security off: nothing is proven, and the protocol's own checks are all there is.
  if (incoming.peer_instance.empty()) return absl::OkStatus();
  const RankInfo* info = nullptr;
  if (auto* m = std::get_if<transfer::RankInfoRequest>(&message)) info = &m->sender;
  if (auto* m = std::get_if<transfer::RankInfoReply>(&message)) info = &m->sender;
  if (info == nullptr) {
    // Other messages name no instance: the one the sender's address was handshaken
    // under must be the one it proved (unknown addresses are dropped downstream).
    auto known = by_address.find(incoming.from);
    if (known == by_address.end() || known->second.first == incoming.peer_instance) {
      return absl::OkStatus();
    }
    return absl::PermissionDeniedError(absl::StrCat(
        "message from the address of another instance: from=", incoming.from,
        " proven=", incoming.peer_instance, " address_of=", known->second.first));
  }
  if (info->instance != incoming.peer_instance) {
    // Refused without an answer: a peer cannot learn this rank's page table,
    // addresses or grants under another instance's name.
    return absl::PermissionDeniedError(
        absl::StrCat("rank info claims another instance than its key proves: claimed=",
                     info->instance, " proven=", incoming.peer_instance,
                     " rank=", info->rank, " from=", incoming.from));
  }
  // Answers go to the address it gave, sealed for the instance it proved.
  if (absl::Status tied = channel->SetPeerInstance(info->control_address, info->instance);
      !tied.ok()) {
    return absl::Status(tied.code(), absl::StrCat("rank info refused: ", tied.message()));
  }
  return absl::OkStatus();
}

void Transceiver::Impl::FinishHandshake(const std::string& address, absl::Status status) {
  MutexLock lock(&mu);
  HandshakeWait& wait = handshakes[address];
  if (wait.done && wait.status.ok()) return;
  wait.done = true;
  wait.status = Copy(status);
  changed.SignalAll();
}

void Transceiver::Impl::MarkReady(const std::string& instance, int64_t rank) {
  MutexLock lock(&mu);
  ready_ranks[instance].insert(rank);
  ++metrics.handshakes;
  changed.SignalAll();
}

std::vector<transfer::PoolGrant> Transceiver::Impl::GrantAll(PeerRank& rank) {
  std::vector<transfer::PoolGrant> grants;
  if (stage_only) return grants;  // The pools are not registered: staging only.
  for (transport::RegionId region : pool_regions) {
    absl::StatusOr<transport::RegionDescriptor> d = transport->GrantRemoteWrite(region, rank.peer);
    if (!d.ok()) {
      Log(absl::StrCat("cannot grant pool to ", rank.info.control_address, ": ", d.status().ToString()));
      return {};
    }
    grants.push_back(transfer::PoolGrant{d->address, d->length, d->key});
  }
  return grants;
}

void Transceiver::Impl::HandleRankInfo(const std::string& from, const RankInfo& info,
                                       bool is_request, const transfer::RankInfoReply* reply) {
  // Whatever we conclude, a requester hears who we are, so it can see for itself
  // why it is refused (CheckCompatible is symmetric).
  absl::Status refusal;
  if (info.role == self.role) {
    refusal = absl::FailedPreconditionError(absl::StrCat(
        "peer rank has this rank's role (a planner with sides swapped is refused): self=",
        self.instance, "/", self.rank, " peer=", info.instance, "/", info.rank));
  } else if (info.instance == self.instance) {
    refusal = absl::FailedPreconditionError(
        absl::StrCat("peer rank claims this rank's instance name: instance=", info.instance));
  } else if (absl::Status compatible = transfer::CheckCompatible(table, info.page_table);
             !compatible.ok()) {
    refusal = absl::Status(compatible.code(),
                           absl::StrCat("incompatible peer rank ", info.instance, "/", info.rank,
                                        ": ", compatible.message()));
  }
  PeerInstance* instance = nullptr;
  if (refusal.ok()) {
    auto [it, inserted] = instances.try_emplace(info.instance);
    instance = &it->second;
    if (inserted) {
      instance->shape = info.page_table.topology;
    } else if (!SameShape(instance->shape, info.page_table.topology)) {
      refusal = absl::FailedPreconditionError(absl::StrCat(
          "ranks of one peer instance disagree on its shape: instance=", info.instance,
          " rank=", info.rank));
    }
  }
  PeerRank* rank = nullptr;
  bool fresh = false;
  if (refusal.ok()) {
    auto existing = instance->ranks.find(info.rank);
    if (existing != instance->ranks.end() &&
        existing->second.info.transport_address != info.transport_address) {
      // The same rank with a new endpoint: a restarted instance. Everything with the
      // old one fails; the new one is a new peer.
      Log(absl::StrCat("peer rank restarted: ", info.instance, "/", info.rank));
      DropInstance(info.instance, absl::UnavailableError(absl::StrCat(
                                      "peer rank restarted: instance=", info.instance,
                                      " rank=", info.rank)));
      instance = &instances[info.instance];
      instance->shape = info.page_table.topology;
      existing = instance->ranks.end();
    }
    if (existing == instance->ranks.end()) {
      absl::StatusOr<transport::PeerId> peer = transport->AddPeer(info.transport_address);
      if (!peer.ok()) {
        refusal = peer.status();
      } else {
        PeerRank fresh_rank;
        fresh_rank.info = info;
        fresh_rank.peer = *peer;
        if (self.role == Role::kContext) {
          absl::StatusOr<transfer::FragmentPlanner> planner =
              transfer::FragmentPlanner::Create(table, info.page_table);
          if (!planner.ok()) {
            refusal = planner.status();
          } else {
            fresh_rank.planner = *std::move(planner);
          }
        }
        if (refusal.ok()) {
          rank = &instance->ranks.emplace(info.rank, std::move(fresh_rank)).first->second;
          fresh = true;
          by_address[info.control_address] = {info.instance, info.rank};
          MutexLock lock(&mu);
          instance_sizes[info.instance] = info.page_table.topology.tp_size *
                                          info.page_table.topology.pp_size;
        }
      }
    } else {
      rank = &existing->second;
    }
  }
  if (!refusal.ok()) {
    if (auto empty = instances.find(info.instance);
        empty != instances.end() && empty->second.ranks.empty()) {
      instances.erase(empty);
    }
    Log(refusal.ToString());
    if (is_request) Send(info.control_address, transfer::RankInfoReply{self, 0, {}, std::nullopt});
    FinishHandshake(info.control_address, refusal);
    FinishHandshake(from, refusal);
    return;
  }
  if (self.role == Role::kGeneration) {
    // Grants go with every answer to a context rank (first epoch 1).
    if (fresh || rank->given_epoch == 0) rank->given_epoch = ++last_epoch;
    // Ready before the reply leaves: a context rank's AddPeerInstance returns on the
    // reply, and an engine may then start a receive here at once. (Its request data
    // still goes out after the reply: commands run on this thread.)
    MarkReady(info.instance, info.rank);
    if (fresh || is_request) {
      Send(info.control_address, transfer::RankInfoReply{self, rank->given_epoch,
                                                         GrantAll(*rank), OfferStaging(*rank)});
    }
    FinishHandshake(info.control_address, absl::OkStatus());
    return;
  }
  // Context side.
  if (is_request) Send(info.control_address, transfer::RankInfoReply{self, 0, {}, std::nullopt});
  if (reply != nullptr && (!reply->grants.empty() || reply->staging.has_value())) {
    if (rank->has_grants && reply->grant_epoch <= rank->grant_epoch) {
      // What this rank holds is as new (a repeated handshake) or newer.
      FinishHandshake(info.control_address, absl::OkStatus());
      return;
    }
    if (!reply->grants.empty() && reply->grants.size() != info.page_table.pools.size()) {
      CountBad(absl::StrCat("grants do not match the pools: rank=", info.rank,
                            " grants=", reply->grants.size(),
                            " pools=", info.page_table.pools.size()));
      return;
    }
    // No pool grants with a staging offer: a rank that takes staged writes only.
    rank->grants.clear();
    for (size_t i = 0; i < reply->grants.size(); ++i) {
      const transfer::PoolGrant& g = reply->grants[i];
      const transfer::Pool& pool = info.page_table.pools[i];
      if (g.length != pool.slot_bytes * static_cast<uint64_t>(pool.num_slots)) {
        CountBad(absl::StrCat("grant length differs from its pool: rank=", info.rank,
                              " pool=", i, " length=", g.length));
        rank->grants.clear();
        return;
      }
      rank->grants.push_back(transport::RegionDescriptor{g.address, g.length, g.key});
    }
    const bool first = !rank->has_grants;
    rank->has_grants = true;
    rank->grant_epoch = reply->grant_epoch;
    // Staging: keep the local arena (and its busy slots, which only credits free)
    // when the geometry stays; a new offer of another shape starts afresh once the
    // old arena has nothing in flight.
    const std::optional<transfer::StagingGrant>& offer = reply->staging;
    const bool fits = offer.has_value() &&
                      offer->slot_bytes <= options.staging.max_arena_bytes / offer->slots;
    if (offer.has_value() && !fits) {
      Log(absl::StrCat("staging offer too large, staging off for rank ", info.rank,
                       ": slots=", offer->slots, " slot_bytes=", offer->slot_bytes));
    }
    SendStaging* staging = rank->staging.get();
    if (!fits || (options.staging.threshold_bytes == 0 && !stage_only)) {
      if (staging == nullptr || staging->in_flight.empty()) rank->staging.reset();
    } else if (staging != nullptr && staging->local.slot_bytes == offer->slot_bytes &&
               staging->local.slots == offer->slots) {
      staging->remote = transport::RegionDescriptor{offer->region.address, offer->region.length,
                                                    offer->region.key};
      // Newer grants: the receiver fenced this rank, or forgot it and made a new
      // arena. Nothing written before can land any more, and credits for chunks
      // before may never come (a new arena owes none): every slot not being
      // written now is free. (A chunk announced before the fence is not scattered:
      // the fence failed every request that waited on this rank.)
      for (uint32_t slot = 0; slot < staging->busy.size(); ++slot) {
        if (staging->in_flight.count(slot) == 0) staging->busy[slot] = false;
      }
      PumpStaging(*rank);
    } else if (staging == nullptr || staging->in_flight.empty()) {
      absl::StatusOr<std::unique_ptr<Arena>> local = MakeArena(offer->slot_bytes, offer->slots);
      if (local.ok()) {
        auto fresh_staging = std::make_unique<SendStaging>();
        fresh_staging->remote = transport::RegionDescriptor{
            offer->region.address, offer->region.length, offer->region.key};
        fresh_staging->local = std::move(**local);
        fresh_staging->busy.assign(offer->slots, false);
        fresh_staging->seq.assign(offer->slots, 0);
        if (staging != nullptr) retired.push_back(std::make_unique<Arena>(std::move(staging->local)));
        rank->staging = std::move(fresh_staging);
      } else {
        Log(absl::StrCat("staging off for rank ", info.rank, ": ", local.status().ToString()));
      }
    }
    if (first) MarkReady(info.instance, info.rank);
    FinishHandshake(info.control_address, absl::OkStatus());
  }
}

Transceiver::Impl::PeerRank* Transceiver::Impl::FindRank(const std::string& from,
                                                         int64_t claimed_rank) {
  auto known = by_address.find(from);
  if (known == by_address.end() || known->second.second != claimed_rank) return nullptr;
  auto instance = instances.find(known->second.first);
  if (instance == instances.end()) return nullptr;
  auto rank = instance->second.ranks.find(claimed_rank);
  return rank == instance->second.ranks.end() ? nullptr : &rank->second;
}

absl::StatusOr<std::vector<int64_t>> Transceiver::Impl::ReceiversOf(PeerInstance& instance,
                                                                    int64_t dp_rank) {
  auto cached = instance.receivers_by_dp_rank.find(dp_rank);
  if (cached != instance.receivers_by_dp_rank.end()) return cached->second;
  absl::StatusOr<std::vector<int64_t>> receivers = std::vector<int64_t>();
  const int64_t ranks = instance.shape.tp_size * instance.shape.pp_size;
  for (int64_t r = 0; r < ranks; ++r) {
    transfer::Topology topology = instance.shape;
    topology.tp_rank = r % topology.tp_size;
    topology.pp_rank = r / topology.tp_size;
    absl::StatusOr<transfer::RankLink> link =
        transfer::LinkRanks(table.topology, topology, heads, self_dp_rank, dp_rank);
    if (!link.ok()) {
      receivers = link.status();
      break;
    }
    if (link->overlaps) receivers->push_back(r);
  }
  // A peer naming ever new DP ranks gets answers, not an ever larger cache.
  if (instance.receivers_by_dp_rank.size() < kMaxCachedDpRanks) {
    instance.receivers_by_dp_rank.emplace(dp_rank, receivers);
  }
  return receivers;
}

void Transceiver::Impl::HandleRequestData(const std::string& from, const transfer::RequestData& data) {
  PeerRank* peer = self.role == Role::kContext ? FindRank(from, data.receiver_rank) : nullptr;
  if (peer == nullptr) {
    MutexLock lock(&mu);
    ++metrics.dropped_messages;
    return;
  }
  SenderEntry& e = Sender(data.unique_rid);
  touched.insert(data.unique_rid);
  std::vector<SessionAction> actions;
  if (e.instance.empty()) {
    e.instance = peer->info.instance;
    absl::StatusOr<std::vector<int64_t>> receivers_of =
        ReceiversOf(instances[e.instance], data.dp_rank);
    if (receivers_of.ok()) {
      e.session.ExpectReceivers(*receivers_of);
    } else {
      e.session.Fail(receivers_of.status(), &actions);
      e.session.ExpectReceivers({});
    }
  }
  if (e.instance != peer->info.instance) {
    // Another instance asks for a request this rank sends elsewhere: refuse it alone.
    transfer::SliceResult refused;
    refused.unique_rid = data.unique_rid;
    refused.slice_id = data.slice_id;
    refused.sender_rank = self.rank;
    refused.outcome = transfer::SliceOutcome::kFailed;
    refused.code = static_cast<int32_t>(absl::StatusCode::kFailedPrecondition);
    refused.reason = "request is being sent to another instance";
    Send(peer->info.control_address, refused);
    return;
  }
  if (data.block_ids_per_group.size() != groups.size()) {
    e.session.Fail(absl::InvalidArgumentError(absl::StrCat(
                       "request data has the wrong number of groups: request=", data.unique_rid,
                       " slice=", data.slice_id, " groups=", data.block_ids_per_group.size(),
                       " expected=", groups.size())),
                   &actions);
  } else if (e.has_task && data.prompt_len != e.prompt_len) {
    e.session.Fail(absl::InvalidArgumentError(absl::StrCat(
                       "sender and receiver disagree on the prompt length: request=",
                       data.unique_rid, " sender=", e.prompt_len, " receiver=", data.prompt_len)),
                   &actions);
  }
  e.session.OnRequestData(data, &actions);
  RunSender(e, std::move(actions));
}

void Transceiver::Impl::HandleResult(const std::string& from, const transfer::SliceResult& result) {
  PeerRank* peer = self.role == Role::kGeneration ? FindRank(from, result.sender_rank) : nullptr;
  auto entry = receivers.find(result.unique_rid);
  if (peer == nullptr || entry == receivers.end() ||
      entry->second->instance != peer->info.instance) {
    MutexLock lock(&mu);
    ++metrics.dropped_messages;
    return;
  }
  ReceiverEntry& e = *entry->second;
  if (result.outcome == transfer::SliceOutcome::kSuccess && result.staged_chunks > 0) {
    const std::pair<int64_t, int64_t> key{result.slice_id, result.sender_rank};
    const int64_t scattered = e.scattered[key];
    if (scattered < result.staged_chunks) {
      e.held.emplace(key, result);  // until its last chunk is scattered
      return;
    }
    if (scattered > result.staged_chunks) {
      FailReceiver(e, absl::DataLossError(absl::StrCat(
                          "sender counts fewer staged chunks than were scattered: request=",
                          result.unique_rid, " slice=", result.slice_id,
                          " sender=", result.sender_rank, " counted=", result.staged_chunks,
                          " scattered=", scattered)));
      return;
    }
  }
  std::vector<SessionAction> actions;
  e.session.OnResult(result, absl::Now(), &actions);
  touched.insert(result.unique_rid);
  RunReceiver(e, std::move(actions));
}

void Transceiver::Impl::FailReceiver(ReceiverEntry& e, absl::Status why) {
  std::vector<SessionAction> actions;
  e.session.Fail(std::move(why), absl::Now(), &actions);
  touched.insert(e.session.request().unique_rid);
  RunReceiver(e, std::move(actions));
}

void Transceiver::Impl::HandleAux(const std::string& from, const transfer::AuxTokens& aux) {
  PeerRank* peer = self.role == Role::kGeneration ? FindRank(from, aux.sender_rank) : nullptr;
  auto entry = receivers.find(aux.unique_rid);
  if (peer == nullptr || entry == receivers.end() ||
      entry->second->instance != peer->info.instance) {
    MutexLock lock(&mu);
    ++metrics.dropped_messages;
    return;
  }
  std::vector<SessionAction> actions;
  entry->second->session.OnAuxTokens(aux, absl::Now(), &actions);
  touched.insert(aux.unique_rid);
  RunReceiver(*entry->second, std::move(actions));
}

void Transceiver::Impl::HandleCancel(const std::string& from, const transfer::Cancel& cancel) {
  PeerRank* peer = FindRank(from, cancel.sender_rank);
  if (peer == nullptr || cancel.from == self.role) {
    MutexLock lock(&mu);
    ++metrics.dropped_messages;
    return;
  }
  const absl::Time now = absl::Now();
  std::vector<SessionAction> actions;
  const std::string reason = absl::StrCat("cancelled by peer ", peer->info.instance, "/",
                                          peer->info.rank, ": ", cancel.reason);
  if (self.role == Role::kContext) {
    auto entry = senders.find(cancel.unique_rid);
    if (entry == senders.end()) {
      cancelled_early[cancel.unique_rid] = now + options.cancel_memory;
      timers.emplace(now + options.cancel_memory, cancel.unique_rid);
      // Nothing of it is in flight from this rank, and a task or request data that
      // comes later ends cancelled: say so (session.h, invariant 5).
      Send(peer->info.control_address,
           transfer::Cancel{cancel.unique_rid, self.rank, Role::kContext,
                            "nothing of the request is in flight from this rank"});
      return;
    }
    SenderEntry& e = *entry->second;
    e.session.OnReceiverCancel(cancel.sender_rank, reason, &actions);
    touched.insert(cancel.unique_rid);
    // Without request data the request is tied to no instance yet: the answer goes
    // to the rank that asked.
    RunSender(e, std::move(actions), e.instance.empty() ? peer->info.instance : e.instance);
    return;
  }
  auto entry = receivers.find(cancel.unique_rid);
  if (entry == receivers.end() || entry->second->instance != peer->info.instance) {
    cancelled_early[cancel.unique_rid] = now + options.cancel_memory;
    timers.emplace(now + options.cancel_memory, cancel.unique_rid);
    return;
  }
  entry->second->session.OnSenderCancel(cancel.sender_rank, reason, now, &actions);
  touched.insert(cancel.unique_rid);
  RunReceiver(*entry->second, std::move(actions));
}

void Transceiver::Impl::RunSender(SenderEntry& e, std::vector<SessionAction> actions,
                                  const std::string& instance_name) {
  touched.insert(e.session.unique_rid());
  // Actions may produce more (a post that fails at once ends its pair).
  for (size_t i = 0; i < actions.size(); ++i) {
    SessionAction action = std::move(actions[i]);
    if (auto* send = std::get_if<transfer::SendMessage>(&action)) {
      const PeerInstance& instance = instances[instance_name.empty() ? e.instance : instance_name];
      auto rank = instance.ranks.find(send->peer_rank);
      if (rank != instance.ranks.end()) Send(rank->second.info.control_address, send->message);
    } else if (auto* post = std::get_if<transfer::PostSlice>(&action)) {
      PlanAndPost(e, post->slice_id, post->receiver_rank, &actions);
    } else if (std::holds_alternative<transfer::CancelPosted>(action)) {
      for (const auto& [key, flight] : e.in_flight) {
        absl::Status cancelled = transport->CancelTransfer(flight.id);
        if (!cancelled.ok()) Log(cancelled.ToString());
      }
      // Staged pairs stop staging; their chunks in flight are cancelled and end them.
      std::vector<StagedJob*> idle;
      for (auto& [key, job] : e.staged) {
        if (job->error.ok()) {
          job->error = absl::AbortedError(absl::StrCat(
              "staged pair cancelled: request=", job->rid, " slice=", job->slice_id));
        }
        job->next = job->fragments.size();
        if (job->in_flight == 0) idle.push_back(job.get());
      }
      for (const auto& [name, instance] : instances) {
        for (const auto& [rank_id, peer] : instance.ranks) {
          if (peer.staging == nullptr) continue;
          for (const auto& [slot, write] : peer.staging->in_flight) {
            if (write.job->rid != e.session.unique_rid()) continue;
            absl::Status cancelled = transport->CancelTransfer(write.id);
            if (!cancelled.ok()) Log(cancelled.ToString());
          }
        }
      }
      EndStagedJobs(idle);
    }
  }
}

void Transceiver::Impl::RunReceiver(ReceiverEntry& e, std::vector<SessionAction> actions) {
  const uint64_t rid = e.session.request().unique_rid;
  touched.insert(rid);
  for (size_t i = 0; i < actions.size(); ++i) {
    SessionAction action = std::move(actions[i]);
    if (auto* send = std::get_if<transfer::SendMessage>(&action)) {
      const PeerInstance& instance = instances[e.instance];
      auto rank = instance.ranks.find(send->peer_rank);
      if (rank != instance.ranks.end()) Send(rank->second.info.control_address, send->message);
    } else if (auto* fence = std::get_if<transfer::FenceSender>(&action)) {
      Fence(e.instance, fence->sender_rank);
    }
  }
  // Its deadline moves when it starts failing (the report grace).
  auto still = receivers.find(rid);
  if (still != receivers.end()) {
    const absl::Time next = still->second->session.next_deadline();
    if (next != still->second->timer) {
      still->second->timer = next;
      if (next != absl::InfiniteFuture()) timers.emplace(next, rid);
    }
  }
}

void Transceiver::Impl::PlanAndPost(SenderEntry& e, int64_t slice_id, int64_t receiver,
                                    std::vector<SessionAction>* out) {
  const absl::Time start = absl::Now();
  auto fail = [&](absl::Status status) {
    e.session.OnSliceEnded(slice_id, receiver, transfer::SliceOutcomeInfo{status, true, 0, 0}, out);
  };
  PeerInstance& instance = instances[e.instance];
  auto rank = instance.ranks.find(receiver);
  const KVSlice* slice = e.session.slice(slice_id);
  const transfer::RequestData* data = e.session.request_data(slice_id, receiver);
  if (rank == instance.ranks.end() || slice == nullptr || data == nullptr) {
    return fail(absl::InternalError(absl::StrCat("nothing to post: request=", e.session.unique_rid(),
                                                 " slice=", slice_id, " receiver=", receiver)));
  }
  PeerRank& peer = rank->second;
  if (!peer.has_grants || peer.grant_epoch != data->grant_epoch) {
    // The writes of a request use the grants its request data named: older ones are
    // revoked, newer ones belong to requests after a fence.
    return fail(absl::FailedPreconditionError(absl::StrCat(
        "request data names grants this rank does not hold: request=", e.session.unique_rid(),
        " receiver=", receiver, " epoch=", data->grant_epoch, " held=", peer.grant_epoch)));
  }
  absl::StatusOr<transfer::TokenRange> dst_range =
      transfer::TokenRange::Create(data->token_start, data->token_end);
  if (!dst_range.ok()) return fail(dst_range.status());
  KVSlice dst;
  dst.token_range = *dst_range;
  dst.block_ids_per_layer_group = data->block_ids_per_group;
  dst.is_last_slice = data->is_last_slice;
  transfer::PairingOptions pairing;
  pairing.tokens_per_block = table.tokens_per_block;
  pairing.prompt_len = e.prompt_len;
  pairing.windows = windows;
  pairing.dst_start_token = data->dst_start_token;
  pairing.request_id = static_cast<int64_t>(e.session.unique_rid());
  pairing.slice_id = slice_id;
  if (absl::Status paired = transfer::PairSliceBlocksInto(*slice, dst, pairing, &pairs);
      !paired.ok()) {
    return fail(paired);
  }
  transfer::PlanContext context;
  context.request_id = static_cast<int64_t>(e.session.unique_rid());
  context.slice_id = slice_id;
  context.src_state_slot = e.state_slot;
  context.dst_state_slot = data->state_slot;
  absl::Status planned = peer.planner->PlanInto(pairs, context, &plan);
  if (!planned.ok()) return fail(planned);
  int64_t paired = 0;
  for (const transfer::GroupPairing& g : pairs) paired += static_cast<int64_t>(g.src.size());
  int64_t held = 0;
  for (const transfer::BlockList& list : slice->block_ids_per_layer_group) {
    held += static_cast<int64_t>(list.size());
  }
  e.metrics.blocks += paired;
  e.metrics.blocks_skipped += held - paired;
  e.metrics.fragments += plan.fragments_before_coalescing;
  const absl::Time planned_at = absl::Now();
  e.metrics.plan += planned_at - start;
  if (plan.fragments.empty()) {
    // A replica that only reports, or nothing left to move: an empty write.
    e.session.OnSliceEnded(slice_id, receiver, transfer::SliceOutcomeInfo{}, out);
    return;
  }
  // Staged: always when either side's pools are not exposed to RDMA (staging only:
  // no pool grants, or this rank did not register its pools), else when the writes
  // are small on average.
  const bool must_stage = stage_only || peer.grants.empty();
  const bool small = plan.fragments.size() > 1 &&
                     plan.total_bytes / plan.fragments.size() < options.staging.threshold_bytes;
  if (must_stage || (small && peer.staging != nullptr)) {
    if (peer.staging == nullptr) {
      return fail(absl::FailedPreconditionError(absl::StrCat(
          "pair must be staged but the receiver offers no staging: request=",
          e.session.unique_rid(), " receiver=", receiver)));
    }
    StageJob(e, peer, slice_id, receiver);
    if (!e.first_post.has_value()) e.first_post = planned_at;
    return;  // The job ends the pair (OnSliceEnded) once its chunks are delivered.
  }
  ops.clear();
  for (const transfer::Fragment& f : plan.fragments) {
    ops.push_back(transport::WriteOp{pool_regions[f.src_pool], f.src_offset,
                                     peer.grants[f.dst_pool], f.dst_offset, f.bytes});
  }
  absl::StatusOr<transport::TransferId> id =
      transport->PostWrites(peer.peer, ops, e.session.deadline());
  e.metrics.post += absl::Now() - planned_at;
  if (!id.ok()) return fail(id.status());
  if (!e.first_post.has_value()) e.first_post = planned_at;
  e.in_flight[{slice_id, receiver}] =
      InFlight{*id, plan.total_bytes, static_cast<int64_t>(plan.fragments.size())};
  posting.insert(e.session.unique_rid());
}

void Transceiver::Impl::PollTransfers() {
  for (auto rid = posting.begin(); rid != posting.end();) {
    auto entry = senders.find(*rid);
    if (entry == senders.end()) {
      rid = posting.erase(rid);
      continue;
    }
    SenderEntry& e = *entry->second;
    std::vector<SessionAction> actions;
    for (auto it = e.in_flight.begin(); it != e.in_flight.end();) {
      absl::StatusOr<transport::TransferStatus> status = transport->PollTransfer(it->second.id);
      transfer::SliceOutcomeInfo outcome;
      if (!status.ok()) {
        outcome.status = status.status();  // Forgotten: a kvx bug; report it.
        outcome.settled = false;
      } else if (!status->final()) {
        ++it;
        continue;
      } else if (status->state == transport::TransferState::kQuiesced) {
        outcome.status = status->error;
        outcome.settled = status->target_settled;
      } else {
        outcome.bytes = it->second.bytes;
        outcome.writes = it->second.writes;
        e.metrics.bytes += it->second.bytes;
        e.metrics.writes += it->second.writes;
        e.metrics.transfer = absl::Now() - e.first_post.value_or(absl::Now());
      }
      const auto key = it->first;
      it = e.in_flight.erase(it);
      e.session.OnSliceEnded(key.first, key.second, outcome, &actions);
    }
    if (!actions.empty()) RunSender(e, std::move(actions));
    touched.insert(*rid);
    rid = e.in_flight.empty() ? posting.erase(rid) : std::next(rid);
  }
}

void Transceiver::Impl::FireTimers(absl::Time now) {
  // Entries of finished requests are dropped lazily; rebuild before they dominate.
  const size_t live_entries = senders.size() + receivers.size() + cancelled_early.size();
  if (timers.size() > 4 * live_entries + 1024) {
    std::vector<std::pair<absl::Time, uint64_t>> keep;
    for (const auto& [rid, e] : senders) {
      keep.emplace_back(e->session.deadline(), rid);
      keep.emplace_back(e->started + options.request_data_ttl, rid);
      // Ended before any engine task came: let go at this time (Publish).
      if (e->unclaimed_until.has_value()) keep.emplace_back(*e->unclaimed_until, rid);
    }
    for (const auto& [rid, e] : receivers) keep.emplace_back(e->timer, rid);
    for (const auto& [rid, until] : cancelled_early) keep.emplace_back(until, rid);
    timers = decltype(timers)(std::greater<>(), std::move(keep));
  }
  while (!timers.empty() && timers.top().first <= now) {
    const uint64_t rid = timers.top().second;
    timers.pop();
    if (auto c = cancelled_early.find(rid); c != cancelled_early.end() && c->second <= now) {
      cancelled_early.erase(c);
    }
    std::vector<SessionAction> actions;
    if (auto s = senders.find(rid); s != senders.end()) {
      SenderEntry& e = *s->second;
      if (!e.has_task && now >= e.started + options.request_data_ttl) {
        e.session.Fail(absl::DeadlineExceededError(absl::StrCat(
                           "request data waited for the engine's task longer than "
                           "request_data_ttl: request=", rid)),
                       &actions);
      } else {
        e.session.OnDeadline(now, &actions);
      }
      RunSender(e, std::move(actions));
    } else if (auto r = receivers.find(rid); r != receivers.end()) {
      r->second->session.OnDeadline(now, &actions);
      RunReceiver(*r->second, std::move(actions));
    }
  }
}

void Transceiver::Impl::Fence(const std::string& instance_name, int64_t rank_id) {
  auto instance = instances.find(instance_name);
  if (instance == instances.end()) return;
  auto rank = instance->second.ranks.find(rank_id);
  if (rank == instance->second.ranks.end()) return;
  PeerRank& peer = rank->second;
  absl::Status removed = transport->RemovePeer(peer.peer);
  if (!removed.ok()) Log(absl::StrCat("fence failed: ", removed.ToString()));
  {
    MutexLock lock(&mu);
    ++metrics.fences;
  }
  Log(absl::StrCat("fenced sender ", instance_name, "/", rank_id));
  // Back in business with fresh keys: the new epoch is what later request data
  // names, so nothing planned against the old grants can ever use the new ones.
  absl::StatusOr<transport::PeerId> again = transport->AddPeer(peer.info.transport_address);
  if (again.ok()) {
    peer.peer = *again;
    peer.given_epoch = ++last_epoch;
    transfer::RankInfoReply regrant{self, peer.given_epoch, GrantAll(peer), OfferStaging(peer)};
    Send(peer.info.control_address, regrant);
  }
  const absl::Time now = absl::Now();
  for (auto& [rid, entry] : receivers) {
    if (entry->instance != instance_name || !entry->session.waits_on(rank_id)) continue;
    std::vector<SessionAction> actions;
    entry->session.OnSenderFenced(rank_id, now, &actions);
    touched.insert(rid);
    RunReceiver(*entry, std::move(actions));
  }
}

void Transceiver::Impl::DropInstance(const std::string& instance_name, const absl::Status& why) {
  auto instance = instances.find(instance_name);
  if (instance == instances.end()) return;
  const absl::Time now = absl::Now();
  for (auto& [rid, entry] : senders) {
    if (entry->instance != instance_name) continue;
    std::vector<SessionAction> actions;
    entry->session.Fail(why, &actions);
    RunSender(*entry, std::move(actions));
  }
  std::vector<StagedJob*> abandoned;
  for (auto& [rank_id, peer] : instance->second.ranks) {
    // Removing the transport peer is the fence; every receiver stops waiting on it.
    absl::Status removed = transport->RemovePeer(peer.peer);
    if (!removed.ok()) Log(removed.ToString());
    channel->Disconnect(peer.info.control_address);
    by_address.erase(peer.info.control_address);
    // Staged chunks to it are abandoned with it; the arenas go once the transport
    // lets them go (RetireArenas).
    if (peer.staging != nullptr) {
      for (auto& [slot, write] : peer.staging->in_flight) {
        if (write.job->error.ok()) write.job->error = why;
        write.job->next = write.job->fragments.size();
        if (--write.job->in_flight == 0) abandoned.push_back(write.job);
      }
      peer.staging->in_flight.clear();
      retired.push_back(std::make_unique<Arena>(std::move(peer.staging->local)));
    }
    if (peer.arena != nullptr) retired.push_back(std::move(peer.arena));
  }
  EndStagedJobs(abandoned);
  for (auto& [rid, entry] : receivers) {
    if (entry->instance != instance_name) continue;
    std::vector<SessionAction> actions;
    entry->session.Fail(why, now, &actions);
    for (const auto& [rank_id, peer] : instance->second.ranks) {
      entry->session.OnSenderFenced(rank_id, now, &actions);
    }
    touched.insert(rid);
    // Nothing to send to: the instance is gone. Only the state matters now.
  }
  instances.erase(instance);
  MutexLock lock(&mu);
  ready_ranks.erase(instance_name);
  instance_sizes.erase(instance_name);
  changed.SignalAll();
}

// --- Staging mode ------------------------------------------------------------------

std::optional<transfer::StagingGrant> Transceiver::Impl::OfferStaging(PeerRank& rank) {
  const TransceiverOptions::Staging& config = options.staging;
  if ((config.threshold_bytes == 0 && !stage_only) || config.slots == 0 ||
      config.slot_bytes == 0) {
    return std::nullopt;
  }
  if (rank.arena == nullptr) {
    absl::StatusOr<std::unique_ptr<Arena>> arena = MakeArena(config.slot_bytes, config.slots);
    if (!arena.ok()) {
      Log(absl::StrCat("staging off for ", rank.info.instance, "/", rank.info.rank, ": ",
                       arena.status().ToString()));
      return std::nullopt;
    }
    rank.arena = *std::move(arena);
  }
  absl::StatusOr<transport::RegionDescriptor> grant =
      transport->GrantRemoteWrite(rank.arena->region, rank.peer);
  if (!grant.ok()) {
    Log(absl::StrCat("staging off for ", rank.info.instance, "/", rank.info.rank, ": ",
                     grant.status().ToString()));
    return std::nullopt;
  }
  transfer::StagingGrant offer;
  offer.region = transfer::PoolGrant{grant->address, grant->length, grant->key};
  offer.slot_bytes = rank.arena->slot_bytes;
  offer.slots = rank.arena->slots;
  return offer;
}

absl::StatusOr<std::unique_ptr<Transceiver::Impl::Arena>> Transceiver::Impl::MakeArena(
    uint64_t slot_bytes, uint32_t slots) {
  auto arena = std::make_unique<Arena>();
  arena->slot_bytes = slot_bytes;
  arena->slots = slots;
  arena->taken_seq.assign(slots, 0);
  const uint64_t bytes = slot_bytes * slots;
  if (pool_memory == transport::MemoryKind::kCuda) {
    absl::StatusOr<kernels::PinnedHostBuffer> pinned = kernels::PinnedHostBuffer::Create(bytes);
    if (!pinned.ok()) return pinned.status();
    arena->pinned = *std::move(pinned);
    arena->base = static_cast<char*>(arena->pinned->data());
    for (uint32_t i = 0; i < slots; ++i) {
      absl::StatusOr<std::unique_ptr<kernels::DeviceWorkspace>> workspace =
          kernels::DeviceWorkspace::Create(kMaxChunkFragments);
      if (!workspace.ok()) return workspace.status();
      arena->workspaces.push_back(*std::move(workspace));
    }
  } else {
    arena->bytes.reset(new char[bytes]);
    arena->base = arena->bytes.get();
  }
  absl::StatusOr<transport::RegionId> region = transport->RegisterMemory(arena->base, bytes);
  if (!region.ok()) return region.status();
  arena->region = *region;
  return arena;
}

kernels::Launch Transceiver::Impl::LaunchFor(const Arena& arena, uint32_t slot) const {
  return arena.workspaces.empty() ? kernels::Launch::Host()
                                  : kernels::Launch::Cuda(arena.workspaces[slot].get());
}

void Transceiver::Impl::StageJob(SenderEntry& e, PeerRank& peer, int64_t slice_id,
                                 int64_t receiver) {
  auto job = std::make_unique<StagedJob>();
  job->rid = e.session.unique_rid();
  job->slice_id = slice_id;
  job->receiver = receiver;
  job->fragments = plan.fragments;
  StagedJob* raw = job.get();
  e.staged[{slice_id, receiver}] = std::move(job);
  peer.staging->queue.push_back(raw);
  PumpStaging(peer);
}

// Fills every free slot with the next chunk of the oldest job, FIFO over jobs.
void Transceiver::Impl::PumpStaging(PeerRank& peer) {
  SendStaging& staging = *peer.staging;
  Arena& local = staging.local;
  std::vector<kernels::SrcFragment> sources;
  while (!staging.queue.empty()) {
    StagedJob& job = *staging.queue.front();
    if (job.done()) {
      staging.queue.pop_front();
      continue;
    }
    uint32_t slot = 0;
    while (slot < local.slots && staging.busy[slot]) ++slot;
    if (slot == local.slots) return;  // Every slot waits for its credit.
    auto entry = senders.find(job.rid);
    if (entry == senders.end()) {  // Cannot happen: a job ends before its request.
      staging.queue.pop_front();
      continue;
    }
    // The chunk: fragments (a large one split) until the slot is full.
    transfer::StagedChunk chunk;
    chunk.unique_rid = job.rid;
    chunk.slice_id = job.slice_id;
    chunk.sender_rank = self.rank;
    chunk.slot = slot;
    chunk.seq = ++last_chunk_seq;
    sources.clear();
    uint64_t used = 0;
    while (!job.done() && used < local.slot_bytes && chunk.fragments.size() < kMaxChunkFragments) {
      const transfer::Fragment& f = job.fragments[job.next];
      const uint64_t take = std::min(f.bytes - job.next_offset, local.slot_bytes - used);
      const transfer::Pool& pool = table.pools[f.src_pool];
      sources.push_back(kernels::SrcFragment{
          reinterpret_cast<const char*>(pool.base_address) + f.src_offset + job.next_offset, take});
      chunk.fragments.push_back(
          transfer::StagedFragment{f.dst_pool, f.dst_offset + job.next_offset, take});
      used += take;
      job.next_offset += take;
      if (job.next_offset == f.bytes) {
        ++job.next;
        job.next_offset = 0;
      }
    }
    // The copy is synchronous, but the slot's previous chunk and the other slots'
    // writes go on meanwhile on the transport's thread.
    const kernels::Launch launch = LaunchFor(local, slot);
    absl::Status gathered = kernels::Gather(
        launch, sources, kernels::StagingBuffer{local.slot(slot), local.slot_bytes}, 0);
    if (gathered.ok()) gathered = kernels::Wait(launch);
    absl::StatusOr<transport::TransferId> id =
        gathered.ok() ? transport->PostWrites(
                            peer.peer,
                            {transport::WriteOp{local.region, uint64_t{slot} * local.slot_bytes,
                                                staging.remote, uint64_t{slot} * local.slot_bytes,
                                                used}},
                            entry->second->session.deadline())
                      : absl::StatusOr<transport::TransferId>(gathered);
    if (!id.ok()) {
      // Nothing was posted: the slot stays free, the pair fails.
      if (job.error.ok()) job.error = id.status();
      job.next = job.fragments.size();
      staging.queue.pop_front();
      if (job.in_flight == 0) EndStagedJob(job);
      continue;
    }
    staging.busy[slot] = true;
    staging.seq[slot] = chunk.seq;
    ++job.in_flight;
    staging.in_flight[slot] = StagedWrite{*id, &job, std::move(chunk), used, peer.grant_epoch};
  }
}

void Transceiver::Impl::PollStaging() {
  std::vector<StagedJob*> ended;
  for (auto& [name, instance] : instances) {
    for (auto& [rank_id, peer] : instance.ranks) {
      if (peer.staging == nullptr || peer.staging->in_flight.empty()) continue;
      SendStaging& staging = *peer.staging;
      for (auto it = staging.in_flight.begin(); it != staging.in_flight.end();) {
        absl::StatusOr<transport::TransferStatus> status = transport->PollTransfer(it->second.id);
        if (status.ok() && !status->final()) {
          ++it;
          continue;
        }
        StagedWrite& write = it->second;
        StagedJob& job = *write.job;
        --job.in_flight;
        if (status.ok() && status->state == transport::TransferState::kDone) {
          // Delivered: now the receiver may scatter it. The slot stays busy until
          // its credit says it did.
          ++job.chunks;
          job.bytes += write.bytes;
          Send(peer.info.control_address, write.chunk);
        } else {
          // Never scattered (no StagedChunk goes out), so no byte of it reaches the
          // receiver's pools. The slot is usable again only if nothing can still land
          // in it: the write settled, or the receiver fenced this rank since (its
          // grants are newer). Else the pair is reported unsettled, so that the
          // receiver fences this rank, and the slot waits for those new grants.
          const bool settled = (status.ok() && status->target_settled) ||
                               write.grant_epoch < peer.grant_epoch;
          if (settled) staging.busy[it->first] = false;
          job.unsettled |= !settled;
          if (job.error.ok()) {
            job.error = status.ok() ? status->error : status.status();
            job.next = job.fragments.size();
          }
        }
        if (job.in_flight == 0 && (job.done() || !job.error.ok())) ended.push_back(&job);
        it = staging.in_flight.erase(it);
      }
      PumpStaging(peer);
    }
  }
  EndStagedJobs(ended);
}

void Transceiver::Impl::EndStagedJobs(const std::vector<StagedJob*>& jobs) {
  struct Key {
    uint64_t rid;
    std::pair<int64_t, int64_t> pair;  // (slice, receiver)
    const StagedJob* job;
  };
  std::vector<Key> keys;
  keys.reserve(jobs.size());
  for (const StagedJob* job : jobs) keys.push_back({job->rid, {job->slice_id, job->receiver}, job});
  for (const Key& key : keys) {
    auto entry = senders.find(key.rid);
    if (entry == senders.end()) continue;
    auto owned = entry->second->staged.find(key.pair);
    if (owned == entry->second->staged.end() || owned->second.get() != key.job) continue;
    EndStagedJob(*owned->second);
  }
}

void Transceiver::Impl::EndStagedJob(StagedJob& job) {
  auto entry = senders.find(job.rid);
  if (entry == senders.end()) return;
  SenderEntry& e = *entry->second;
  auto owned = e.staged.find({job.slice_id, job.receiver});
  if (owned == e.staged.end() || owned->second.get() != &job) return;
  // Off every queue before it goes.
  for (auto& [name, instance] : instances) {
    for (auto& [rank_id, peer] : instance.ranks) {
      if (peer.staging == nullptr) continue;
      std::deque<StagedJob*>& queue = peer.staging->queue;
      queue.erase(std::remove(queue.begin(), queue.end(), &job), queue.end());
    }
  }
  transfer::SliceOutcomeInfo outcome;
  outcome.status = job.error;
  outcome.settled = !job.unsettled;
  outcome.bytes = job.bytes;
  outcome.writes = job.chunks;
  outcome.staged_chunks = job.chunks;
  if (job.error.ok()) {
    e.metrics.bytes += job.bytes;
    e.metrics.writes += job.chunks;
    e.metrics.transfer = absl::Now() - e.first_post.value_or(absl::Now());
    MutexLock lock(&mu);
    metrics.staged_chunks += job.chunks;
  }
  const int64_t slice_id = job.slice_id;
  const int64_t receiver = job.receiver;
  e.staged.erase(owned);
  std::vector<SessionAction> actions;
  e.session.OnSliceEnded(slice_id, receiver, outcome, &actions);
  RunSender(e, std::move(actions));
}

void Transceiver::Impl::RetireArenas() {
  for (auto it = retired.begin(); it != retired.end();) {
    absl::Status freed = transport->DeregisterMemory((*it)->region);
    if (freed.ok() || absl::IsNotFound(freed)) {
      it = retired.erase(it);
    } else {
      ++it;  // Still read by a transfer that has not quiesced, or still granted.
    }
  }
}

void Transceiver::Impl::HandleStagedChunk(const std::string& from,
                                          const transfer::StagedChunk& chunk) {
  PeerRank* peer = self.role == Role::kGeneration ? FindRank(from, chunk.sender_rank) : nullptr;
  if (peer == nullptr || peer->arena == nullptr || chunk.slot >= peer->arena->slots) {
    CountBad(absl::StrCat("staged chunk from an unknown rank or slot: from=", from,
                          " slot=", chunk.slot));
    return;
  }
  Arena& arena = *peer->arena;
  if (chunk.seq <= arena.taken_seq[chunk.slot]) {
    // A repeated or late copy: the slot may hold a later chunk by now. The first
    // copy was credited already.
    MutexLock lock(&mu);
    ++metrics.dropped_messages;
    return;
  }
  arena.taken_seq[chunk.slot] = chunk.seq;
  // Scatter only into a request that still waits on this sender: a late chunk of a
  // request that ended must not touch pages that may belong to another one now.
  auto entry = receivers.find(chunk.unique_rid);
  const bool wanted = entry != receivers.end() &&
                      entry->second->instance == peer->info.instance &&
                      entry->second->session.waits_on(chunk.sender_rank);
  std::vector<kernels::DstFragment> targets;
  uint64_t total = 0;
  bool valid = true;
  for (const transfer::StagedFragment& f : chunk.fragments) {
    const bool pool_ok = f.pool >= 0 && static_cast<size_t>(f.pool) < table.pools.size();
    const uint64_t pool_bytes =
        pool_ok ? table.pools[f.pool].slot_bytes * static_cast<uint64_t>(table.pools[f.pool].num_slots)
                : 0;
    if (!pool_ok || f.offset > pool_bytes || f.bytes > pool_bytes - f.offset ||
        f.bytes > arena.slot_bytes - total) {
      valid = false;
      break;
    }
    total += f.bytes;
    targets.push_back(kernels::DstFragment{
        reinterpret_cast<char*>(table.pools[f.pool].base_address) + f.offset, f.bytes});
  }
  if (!valid) {
    CountBad(absl::StrCat("staged chunk outside this rank's pools or its slot: from=", from,
                          " request=", chunk.unique_rid));
  } else if (wanted) {
    const kernels::Launch launch = LaunchFor(arena, chunk.slot);
    absl::Status scattered = kernels::Scatter(
        launch, kernels::StagingBuffer{arena.slot(chunk.slot), arena.slot_bytes}, 0, targets);
    if (scattered.ok()) scattered = kernels::Wait(launch);
    ReceiverEntry& e = *entry->second;
    if (!scattered.ok()) {
      FailReceiver(e, absl::Status(scattered.code(),
                                   absl::StrCat("scattering a staged chunk failed: request=",
                                                chunk.unique_rid, " slice=", chunk.slice_id,
                                                " sender=", chunk.sender_rank, ": ",
                                                scattered.message())));
    } else {
      const std::pair<int64_t, int64_t> key{chunk.slice_id, chunk.sender_rank};
      const int64_t count = ++e.scattered[key];
      auto held = e.held.find(key);
      if (held != e.held.end() && count == held->second.staged_chunks) {
        const transfer::SliceResult result = std::move(held->second);
        e.held.erase(held);
        std::vector<SessionAction> actions;
        e.session.OnResult(result, absl::Now(), &actions);
        touched.insert(chunk.unique_rid);
        RunReceiver(e, std::move(actions));
      }
      MutexLock lock(&mu);
      ++metrics.staged_chunks;
    }
  } else {
    MutexLock lock(&mu);
    ++metrics.dropped_messages;
  }
  // Scattered or not, the slot is free again.
  Send(peer->info.control_address, transfer::StagingCredit{self.rank, chunk.slot, chunk.seq});
}

void Transceiver::Impl::HandleStagingCredit(const std::string& from,
                                            const transfer::StagingCredit& credit) {
  PeerRank* peer = self.role == Role::kContext ? FindRank(from, credit.receiver_rank) : nullptr;
  if (peer == nullptr || peer->staging == nullptr || credit.slot >= peer->staging->busy.size()) {
    CountBad(absl::StrCat("staging credit for an unknown rank or slot: from=", from,
                          " slot=", credit.slot));
    return;
  }
  SendStaging& staging = *peer->staging;
  if (!staging.busy[credit.slot] || staging.in_flight.count(credit.slot) > 0 ||
      staging.seq[credit.slot] != credit.seq) {
    // A repeated or late credit: the slot is free already, or holds a later chunk
    // the receiver has not taken yet.
    MutexLock lock(&mu);
    ++metrics.dropped_messages;
    return;
  }
  peer->staging->busy[credit.slot] = false;
  PumpStaging(*peer);
}

RequestStatus Transceiver::Impl::StatusOf(const SenderEntry& e) const {
  RequestStatus status;
  status.unique_rid = e.session.unique_rid();
  status.role = Role::kContext;
  status.state = e.session.state();
  status.error = Copy(e.session.error());
  status.metrics = e.metrics;
  status.metrics.total = absl::Now() - e.started;
  return status;
}

RequestStatus Transceiver::Impl::StatusOf(const ReceiverEntry& e) const {
  RequestStatus status;
  status.unique_rid = e.session.request().unique_rid;
  status.role = Role::kGeneration;
  status.state = e.session.state();
  status.error = Copy(e.session.error());
  status.aux_tokens = e.session.aux_tokens();
  status.metrics = e.metrics;
  status.metrics.bytes = e.session.bytes();
  status.metrics.writes = e.session.writes();
  status.metrics.total = absl::Now() - e.started;
  return status;
}

void Transceiver::Impl::Publish() {
  const std::pair<int64_t, int64_t> gauges{
      static_cast<int64_t>(senders.size() + receivers.size()),
      static_cast<int64_t>(cancelled_early.size())};
  if (touched.empty() && gauges == published_gauges) return;
  std::vector<RequestStatus> statuses;
  for (uint64_t rid : touched) {
    if (auto s = senders.find(rid); s != senders.end()) {
      // A sender entry that request data alone created is reported only if the
      // engine asked for the request too (live holds only what the engine asked).
      // One that ended before the engine's task came waits for that task for
      // cancel_memory, so the task ends at once the same way; one cancelled by a
      // cancel that is remembered anyway (cancelled_early) need not.
      SenderEntry& e = *s->second;
      statuses.push_back(StatusOf(e));
      if (transfer::IsFinal(e.session.state()) && e.in_flight.empty() && e.staged.empty()) {
        if (e.has_task) {
          // Receivers that ask after a cancel must hear it at once (their request
          // data would otherwise wait for a task that never comes): remember it.
          if (e.session.state() == SessionState::kCancelled) {
            cancelled_early[rid] = absl::Now() + options.cancel_memory;
            timers.emplace(cancelled_early[rid], rid);
          }
          senders.erase(s);
        } else if (e.session.state() == SessionState::kCancelled &&
                   cancelled_early.count(rid) > 0) {
          senders.erase(s);  // Sender() ends a later task the same way.
        } else if (!e.unclaimed_until.has_value()) {
          e.unclaimed_until = absl::Now() + options.cancel_memory;
          timers.emplace(*e.unclaimed_until, rid);
        } else if (absl::Now() >= *e.unclaimed_until) {
          senders.erase(s);
        }
      }
    } else if (auto r = receivers.find(rid); r != receivers.end()) {
      statuses.push_back(StatusOf(*r->second));
      if (transfer::IsFinal(r->second->session.state())) receivers.erase(r);
    }
  }
  touched.clear();
  // After the erasures above, so a request collected final is no longer counted.
  published_gauges = {static_cast<int64_t>(senders.size() + receivers.size()),
                      static_cast<int64_t>(cancelled_early.size())};
  MutexLock lock(&mu);
  metrics.sessions = published_gauges.first;
  metrics.remembered_cancels = published_gauges.second;
  for (RequestStatus& status : statuses) {
    auto live_entry = live.find(status.unique_rid);
    if (live_entry == live.end()) continue;  // The engine never asked for it.
    if (!status.final()) {
      live_entry->second = std::move(status);
      continue;
    }
    live.erase(live_entry);
    if (status.state == SessionState::kFullyTransferred) {
      ++metrics.requests_succeeded;
    } else if (status.state == SessionState::kCancelled) {
      ++metrics.requests_cancelled;
    } else {
      ++metrics.requests_failed;
    }
    metrics.bytes += status.metrics.bytes;
    metrics.writes += status.metrics.writes;
    Uncollected& done = status.role == Role::kContext ? done_context : done_generation;
    done.states[status.unique_rid] = status.state;
    done.statuses.push_back(std::move(status));
  }
  changed.SignalAll();
}

}  // namespace kvx::transceiver
