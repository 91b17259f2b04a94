// Fault injection end to end (issue 11). For each fault, the surviving side ends
// exactly the affected requests FAILED or TIMEOUT (kError, or kCancelled when the
// peer's word of the failure came first), keeps serving every other request (each
// byte checked by the reference engine, tools/transceiver_harness.h), and once
// every request is final (guarantee 1: nothing of it can land any more) it holds
// nothing and no byte outside the requests' blocks has changed:
// Instance::CheckAtRest sweeps every byte of every generation pool, and checks
// the free lists, the transceivers' books and their metrics.
//
// Each fault of the issue is covered once:
//
//   fault                                        test
//   -------------------------------------------  ---------------------------------------------
//   a context rank dies after posting half the   ContextRankDiesHalfwayThroughARequest (here);
//     writes of a request                        transceiver_kill_test kills one at a random
//                                                point and restarts it
//   a generation rank dies while its request     GenerationRankDiesWithItsRequestDataQueued
//     data is queued at the context side         (here)
//   completions delayed past the deadline        CompletionsDelayedPastTheDeadline (here)
//   a write fails                                AFailedWriteFailsOnlyItsRequest (here: a
//                                                direct write and a staged chunk)
//   a control message duplicated, reordered or   transceiver_control_test:
//     truncated                                  DuplicatedMessagesMoveEveryByteOnce,
//                                                ReorderedMessagesMoveEveryByte,
//                                                StaleStagingMessagesChangeNothing,
//                                                TruncatedMessagesFailOnlyTheirRequest
//   a peer sends block ids beyond its pool       transceiver_control_test:
//                                                RequestDataNamingBlocksPastThePoolFails...
//   a peer's page table has overlapping pools    OverlappingPoolsAreRefused (here);
//                                                page_table_test: RejectsMalformedPeerTables
//
// The dying ranks are this binary run again as a child process (--fault_child),
// over libfabric tcp;ofi_rxm on 127.0.0.1; the rest runs in this process over the
// loopback backend. Deaths happen at points the test knows, never after a guessed
// time: the context rank stops itself inside the write it was told to cut short,
// the generation rank is killed once the context side holds its request data.

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>  // NOLINT(build/c++11)
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "testing/status_matchers.h"
#include "tools/transceiver_harness.h"
#include "transfer/control_channel.h"
#include "transfer/page_table.h"
#include "transfer/protocol.h"
#include "transfer/session.h"
#include "transfer/transceiver/transceiver.h"
#include "transport/fault_injecting_transport.h"
#include "transport/forwarding_transport.h"
#include "transport/transport.h"

namespace kvx::harness {
namespace {

using ::kvx::testing::StatusIs;
using ::testing::AnyOf;
using ::testing::Contains;
using ::testing::HasSubstr;
using transfer::SessionState;

constexpr absl::string_view kChildFlag = "--fault_child=";

absl::Time In(absl::Duration d) { return absl::Now() + d; }

// --- The uniform check ------------------------------------------------------------

// Every request of `instance` ended: those in `affected` FAILED or TIMEOUT with one
// of `codes` (on at least one rank; a rank that delivered its part of a failed
// request may report it done), every other one moved every byte on every rank;
// nothing is held and no byte changed where no request was (CheckAtRest).
// REQUIRES: instance.Wait() returned.
void ExpectOnlyAffected(Instance& instance, const std::set<uint64_t>& affected,
                        const std::vector<absl::StatusCode>& codes) {
  SCOPED_TRACE(absl::StrCat("instance=", instance.options().name));
  std::set<uint64_t> seen;
  std::set<uint64_t> failed;
  for (const std::vector<Instance::Record>& records : instance.records()) {
    for (const Instance::Record& r : records) {
      SCOPED_TRACE(absl::StrCat("request=", r.rid));
      seen.insert(r.rid);
      EXPECT_TRUE(r.finished) << r.problem;
      EXPECT_FALSE(r.mismatch) << r.problem;
      EXPECT_FALSE(r.late_write) << r.problem;
      if (affected.count(r.rid) == 0) {
        EXPECT_EQ(r.state, SessionState::kFullyTransferred) << r.error;
        EXPECT_EQ(r.problem, "");
      } else if (r.state != SessionState::kFullyTransferred) {
        failed.insert(r.rid);
        EXPECT_THAT(r.state, AnyOf(SessionState::kError, SessionState::kCancelled));
        EXPECT_THAT(codes, Contains(r.error.code())) << r.error;
      }
    }
  }
  EXPECT_EQ(failed, affected);
  for (const RequestPlan& plan : instance.workload()) {
    EXPECT_EQ(seen.count(plan.rid), 1u) << "request=" << plan.rid << " never ran";
  }
  EXPECT_OK(instance.CheckAtRest());
}

// --- Instances ----------------------------------------------------------------------

// The default model (4 layers, full attention and a 256-token window, 32 KiB
// slots): between ranks of one layout every block pair is one write of a whole
// slot, so no pair is staged and a request's writes are one PostWrites call.
RunOptions Options(const std::string& transport) {
  RunOptions options;
  options.context.tp = 1;
  options.transport.kind = transport;
  options.concurrency = 16;
  options.request_timeout = absl::Seconds(60);
  options.run_timeout = absl::Seconds(120);
  return options;
}

// 4 tokens of 4 heads of 8 bf16 per block: a block of a layer is 256 bytes, too
// small a write to post alone (staging gathers them).
ModelOptions SmallBlocks() {
  ModelOptions model;
  model.head_size = 8;
  model.tokens_per_block = 4;
  model.windows = {std::nullopt, 48};
  return model;
}

// Requests [first, first + n), of different lengths, one with a prefix hit and
// one chunked; `timeout` for those that a fault is to end.
std::vector<RequestPlan> Plans(uint64_t first, int64_t n, std::string context_instance = "",
                               std::optional<absl::Duration> timeout = std::nullopt) {
  std::vector<RequestPlan> plans;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t prompt = 200 + 61 * i;
    RequestPlan plan = MakePlan(first + i, prompt, i == 1 ? 40 : 0,
                                i == 2 ? std::vector<Chunk>{{0, 100}, {100, prompt}}
                                       : std::vector<Chunk>{});
    plan.context_instance = context_instance;
    plan.timeout = timeout;
    plans.push_back(std::move(plan));
  }
  return plans;
}

std::vector<RequestPlan> Concat(std::vector<RequestPlan> a, const std::vector<RequestPlan>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

std::set<uint64_t> Rids(absl::Span<const RequestPlan> plans) {
  std::set<uint64_t> rids;
  for (const RequestPlan& plan : plans) rids.insert(plan.rid);
  return rids;
}

absl::StatusOr<std::unique_ptr<Instance>> MakeInstance(const RunOptions& options, Role role,
                                                       std::string name,
                                                       std::vector<RequestPlan> plans) {
  absl::StatusOr<InstanceOptions> side = SideOptions(options, role);
  if (!side.ok()) return side.status();
  side->name = std::move(name);
  side->report_grace = absl::Milliseconds(500);
  return Instance::Create(*std::move(side), std::move(plans));
}

// Both instances of `options` (its plans on both sides), the handshake done.
struct Pair {
  std::unique_ptr<Instance> context;
  std::unique_ptr<Instance> generation;
};

absl::StatusOr<Pair> MakePair(const RunOptions& context_options,
                              const RunOptions& generation_options) {
  Pair pair;
  absl::StatusOr<std::unique_ptr<Instance>> context = MakeInstance(
      context_options, Role::kContext, context_options.context_name, context_options.plans);
  if (!context.ok()) return context.status();
  absl::StatusOr<std::unique_ptr<Instance>> generation =
      MakeInstance(generation_options, Role::kGeneration, generation_options.generation_name,
                   generation_options.plans);
  if (!generation.ok()) return generation.status();
  pair.context = *std::move(context);
  pair.generation = *std::move(generation);
  if (absl::Status added = pair.generation->AddPeer(pair.context->control_addresses(),
                                                    In(absl::Seconds(30)));
      !added.ok()) {
    return added;
  }
  return pair;
}

absl::StatusOr<Pair> MakePair(const RunOptions& options) { return MakePair(options, options); }

void RunPair(Pair& pair, absl::Duration timeout) {
  pair.context->Start(In(timeout));
  pair.generation->Start(In(timeout));
  pair.generation->Wait();
  pair.context->Wait();
}

// --- The child processes ------------------------------------------------------------

// Scenario "dying_context": context instance "prefill-a", TP1, sends requests 1..5
// one at a time; its rank stops halfway through the writes of request 3 (its
// third PostWrites call) and is killed there. The generation side gives them
// kOwedTimeout: nothing will tell it the rank died.
constexpr absl::Duration kOwedTimeout = absl::Seconds(8);
constexpr int64_t kVictimPost = 2;
constexpr uint64_t kVictim = 3;

std::vector<RequestPlan> DyingContextPlans() {
  std::vector<RequestPlan> plans;
  for (uint64_t rid = 1; rid <= 5; ++rid) {
    RequestPlan plan = MakePlan(rid, 150 + 70 * static_cast<int64_t>(rid));  // one PostWrites
    plan.context_instance = "prefill-a";
    plan.timeout = kOwedTimeout;
    plans.push_back(std::move(plan));
  }
  return plans;
}

// Scenario "doomed_generation": generation instance "decode-a" asks context
// instance "prefill" for requests 21..24 and is killed once the context side
// holds their request data.
std::vector<RequestPlan> DoomedGenerationPlans() {
  return Plans(21, 4, "", kOwedTimeout);
}

// A context rank that stops in the middle of a request: its `victim`-th PostWrites
// call (0-based) posts the first half of the writes, waits until they are
// delivered, says so on stdout and never returns; the parent kills the process.
class StopHalfway final : public transport::ForwardingTransport {
 public:
  StopHalfway(std::unique_ptr<transport::Transport> inner, int64_t victim)
      : ForwardingTransport(std::move(inner)), victim_(victim) {}

  absl::StatusOr<transport::TransferId> PostWrites(transport::PeerId peer,
                                                   absl::Span<const transport::WriteOp> writes,
                                                   absl::Time deadline) override {
    if (calls_.fetch_add(1) != victim_) return inner().PostWrites(peer, writes, deadline);
    const size_t half = writes.size() / 2;
    absl::Status delivered = absl::FailedPreconditionError("nothing posted: writes=1");
    if (half > 0) {
      absl::StatusOr<transport::TransferId> id =
          inner().PostWrites(peer, writes.subspan(0, half), deadline);
      delivered = id.ok() ? transport::AwaitTransfer(inner(), *id, deadline) : id.status();
    }
    const nlohmann::json line = {{"writes", writes.size()},
                                 {"posted", half},
                                 {"delivered", delivered.ok()},
                                 {"status", delivered.ToString()}};
    std::printf("%s\n", line.dump().c_str());
    std::fflush(stdout);
    for (;;) pause();  // Stopped for good: the parent's SIGKILL ends the process.
  }

 private:
  const int64_t victim_;
  std::atomic<int64_t> calls_{0};
};

int Fail(const absl::Status& status) {
  std::printf("%s\n", nlohmann::json{{"error", status.ToString()}}.dump().c_str());
  std::fflush(stdout);
  return 1;
}

// The child's side of a scenario. Prints one JSON line once it is up (the context
// side: its control addresses), then runs until killed; it exits when the
// parent goes away (its stdin closes).
int ChildMain(absl::string_view scenario, const std::vector<std::string>& addresses) {
  static std::atomic<bool> finished{false};
  ExitWhenClosed(STDIN_FILENO, &finished);
  RunOptions options = Options("tcp");
  if (scenario == "dying_context") {
    options.concurrency = 1;  // One request at a time: the victim's call is known.
    options.transport.wrap = [](std::unique_ptr<transport::Transport> inner, int64_t) {
      return std::unique_ptr<transport::Transport>(
          std::make_unique<StopHalfway>(std::move(inner), kVictimPost));
    };
    absl::StatusOr<std::unique_ptr<Instance>> context =
        MakeInstance(options, Role::kContext, "prefill-a", DyingContextPlans());
    if (!context.ok()) return Fail(context.status());
    std::printf("%s\n",
                nlohmann::json{{"control_addresses", (*context)->control_addresses()}}.dump().c_str());
    std::fflush(stdout);
    if (absl::Status peer = (*context)->WaitForPeer(In(absl::Seconds(60))); !peer.ok()) {
      return Fail(peer);
    }
    (*context)->Start(In(options.run_timeout));
    (*context)->Wait();
  } else if (scenario == "doomed_generation") {
    absl::StatusOr<std::unique_ptr<Instance>> generation =
        MakeInstance(options, Role::kGeneration, "decode-a", DoomedGenerationPlans());
    if (!generation.ok()) return Fail(generation.status());
    if (absl::Status added = (*generation)->AddPeer(addresses, In(absl::Seconds(60)));
        !added.ok()) {
      return Fail(added);
    }
    (*generation)->Start(In(options.run_timeout));
    std::printf("%s\n", nlohmann::json{{"started", true}}.dump().c_str());
    std::fflush(stdout);
    (*generation)->Wait();
  } else {
    return Fail(absl::InvalidArgumentError(absl::StrCat("no such scenario: ", scenario)));
  }
  return Fail(absl::InternalError("the child was not killed"));
}

absl::StatusOr<std::unique_ptr<ChildProcess>> SpawnChild(const std::string& scenario,
                                                         std::vector<std::string> args = {}) {
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) return absl::InternalError("cannot read /proc/self/exe");
  args.insert(args.begin(), absl::StrCat(kChildFlag, scenario));
  return ChildProcess::Spawn(std::string(self, static_cast<size_t>(n)), args);
}

// The child's next line as JSON; an {"error": ...} line is an error.
absl::StatusOr<nlohmann::json> ReadJson(ChildProcess& child) {
  absl::StatusOr<std::string> line = child.ReadLine(In(absl::Seconds(60)));
  if (!line.ok()) return line.status();
  nlohmann::json j = nlohmann::json::parse(*line, nullptr, false);
  if (!j.is_object() || j.contains("error")) {
    return absl::InternalError(absl::StrCat("from the child: ", *line));
  }
  return j;
}

// --- The faults ------------------------------------------------------------------

TEST(TransceiverFaultTest, ContextRankDiesHalfwayThroughARequest) {
  const RunOptions options = Options("tcp");
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<ChildProcess> child, SpawnChild("dying_context"));
  ASSERT_OK_AND_ASSIGN(nlohmann::json up, ReadJson(*child));
  const std::vector<RequestPlan> dying = DyingContextPlans();
  const std::vector<RequestPlan> others = Plans(11, 6, "prefill-b");
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Instance> survivor,
                       MakeInstance(options, Role::kContext, "prefill-b", others));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Instance> generation,
                       MakeInstance(options, Role::kGeneration, "decode", Concat(dying, others)));
  ASSERT_OK(generation->AddPeer(up["control_addresses"].get<std::vector<std::string>>(),
                                In(absl::Seconds(30))));
  ASSERT_OK(generation->AddPeer(survivor->control_addresses(), In(absl::Seconds(30))));
  Progress progress;
  generation->Start(In(options.run_timeout), &progress);

  // The child stops inside request 3's writes, half of them delivered...
  ASSERT_OK_AND_ASSIGN(nlohmann::json stop, ReadJson(*child));
  ASSERT_TRUE(stop["delivered"].get<bool>()) << stop.dump();
  EXPECT_GE(stop["posted"].get<int64_t>(), 1) << stop.dump();
  EXPECT_LT(stop["posted"].get<int64_t>(), stop["writes"].get<int64_t>()) << stop.dump();
  // ...having finished requests 1 and 2 before (one at a time). Only they can be
  // final yet (instance prefill-b has not started): await them, then kill.
  ASSERT_TRUE(progress.WaitForDone(2, In(absl::Seconds(30))));
  child->Kill(SIGKILL);
  ASSERT_OK_AND_ASSIGN(int status, child->Wait(In(absl::Seconds(10))));
  EXPECT_EQ(status, 128 + SIGKILL);

  // The other context instance serves its requests while the dead one's wait.
  survivor->Start(In(options.run_timeout));
  generation->Wait();
  survivor->Wait();
  // Request 3 (half written), 4 and 5 (asked for, never started) end by their
  // timeout; the rank is fenced after the report grace.
  ExpectOnlyAffected(*generation, {kVictim, 4, 5},
                     {absl::StatusCode::kDeadlineExceeded, absl::StatusCode::kUnavailable});
  ExpectOnlyAffected(*survivor, {}, {});
  // The others did not wait for the dead rank's requests to end.
  for (const Instance::Record& r : generation->records()[0]) {
    if (Rids(others).count(r.rid) > 0) EXPECT_LT(r.metrics.total, kOwedTimeout) << r.rid;
  }
}

TEST(TransceiverFaultTest, GenerationRankDiesWithItsRequestDataQueued) {
  const RunOptions options = Options("tcp");
  const std::vector<RequestPlan> doomed = DoomedGenerationPlans();
  const std::vector<RequestPlan> others = Plans(31, 6);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Instance> context,
                       MakeInstance(options, Role::kContext, "prefill", Concat(doomed, others)));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Instance> survivor,
                       MakeInstance(options, Role::kGeneration, "decode-b", others));
  ASSERT_OK(survivor->AddPeer(context->control_addresses(), In(absl::Seconds(30))));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<ChildProcess> child,
                       SpawnChild("doomed_generation", context->control_addresses()));
  ASSERT_OK(ReadJson(*child).status());
  // The context engine has not started: the child's request data waits there for
  // its tasks, in the books (a gauge: poll it).
  transceiver::Transceiver& rank = context->rank(0).transceiver();
  const absl::Time patience = In(absl::Seconds(30));
  while (rank.metrics().sessions < static_cast<int64_t>(doomed.size()) && absl::Now() < patience) {
    absl::SleepFor(absl::Milliseconds(2));
  }
  ASSERT_EQ(rank.metrics().sessions, static_cast<int64_t>(doomed.size()));
  child->Kill(SIGKILL);
  ASSERT_OK_AND_ASSIGN(int status, child->Wait(In(absl::Seconds(10))));
  EXPECT_EQ(status, 128 + SIGKILL);

  // Prefill finishes for all of them at once: the dead rank's requests fail, the
  // other instance's move.
  const absl::Time started = absl::Now();
  context->Start(In(options.run_timeout));
  survivor->Start(In(options.run_timeout));
  survivor->Wait();
  context->Wait();
  EXPECT_LT(absl::Now() - started, kOwedTimeout + absl::Seconds(5));
  ExpectOnlyAffected(*context, Rids(doomed),
                     {absl::StatusCode::kUnavailable, absl::StatusCode::kDeadlineExceeded,
                      absl::StatusCode::kAborted});
  ExpectOnlyAffected(*survivor, {}, {});
}

// Context TP2 with attention DP: each request is sent by one rank. Rank 1's
// transport is `fault`, and the requests of DP rank 1 take `timeout`; those of DP
// rank 0 are the others, in flight at the same time.
struct DpRun {
  RunOptions context;
  RunOptions generation;
  std::set<uint64_t> dp_rank_one;
};

DpRun Dp(std::function<void(transport::FaultInjectingTransport&)> fault,
         std::optional<absl::Duration> timeout) {
  RunOptions options = Options("loopback");
  options.context = Shape{2, 1, {}, true};
  options.plans = Plans(1, 10);
  for (RequestPlan& plan : options.plans) {
    plan.context_dp_rank = static_cast<int64_t>(plan.rid % 2);
    if (plan.context_dp_rank == 1) plan.timeout = timeout;
  }
  DpRun run{options, options, {}};
  for (const RequestPlan& plan : options.plans) {
    if (plan.context_dp_rank == 1) run.dp_rank_one.insert(plan.rid);
  }
  run.context.transport.wrap = [fault](std::unique_ptr<transport::Transport> inner,
                                       int64_t rank) {
    if (rank != 1) return inner;
    auto faulty = std::make_unique<transport::FaultInjectingTransport>(std::move(inner));
    fault(*faulty);
    return std::unique_ptr<transport::Transport>(std::move(faulty));
  };
  return run;
}

TEST(TransceiverFaultTest, CompletionsDelayedPastTheDeadline) {
  // The writes of DP rank 1 land, but their completions would come after the
  // requests' deadline: both sides give up at it, and the context side calls them
  // final only once the transport has ended the writes.
  DpRun run = Dp(
      [](transport::FaultInjectingTransport& t) { t.DelayCompletions(absl::Hours(1)); },
      absl::Milliseconds(1500));
  ASSERT_OK_AND_ASSIGN(Pair pair, MakePair(run.context, run.generation));
  RunPair(pair, run.context.run_timeout);
  // A rank fenced after its report grace fails what is left with it (Unavailable).
  ExpectOnlyAffected(*pair.generation, run.dp_rank_one,
                     {absl::StatusCode::kDeadlineExceeded, absl::StatusCode::kUnavailable});
  ExpectOnlyAffected(*pair.context, run.dp_rank_one,
                     {absl::StatusCode::kDeadlineExceeded, absl::StatusCode::kAborted});
}

TEST(TransceiverFaultTest, AFailedWriteFailsOnlyItsRequest) {
  // Context rank 1 sends one request at a time, so the writes it posts first are
  // its first request's. Direct (DP rank 1): the second of them fails, after the
  // first landed. Staged (TP2, each rank sending half of each block's heads of
  // small blocks: writes so small they are gathered into staging slots): the
  // write of its first chunk fails, while rank 0 sends its half.
  struct Case {
    const char* name;
    bool staged;
    int64_t nth;
  };
  for (const Case& c : {Case{"direct", false, 1}, Case{"staged", true, 0}}) {
    SCOPED_TRACE(c.name);
    DpRun run = Dp([nth = c.nth](transport::FaultInjectingTransport& t) { t.FailNthWrite(nth); },
                   std::nullopt);
    if (c.staged) {
      for (RunOptions* side : {&run.context, &run.generation}) {
        side->model = SmallBlocks();
        side->context.attention_dp = false;
        for (RequestPlan& plan : side->plans) plan.context_dp_rank = 0;
      }
    }
    run.context.concurrency = 1;
    ASSERT_OK_AND_ASSIGN(Pair pair, MakePair(run.context, run.generation));
    RunPair(pair, run.context.run_timeout);
    EXPECT_EQ(pair.context->rank(1).transceiver().metrics().staged_chunks > 0, c.staged);
    // Rank 0, staged, may hear of the failure while its half is still under way
    // (the generation side's cancel: Aborted).
    ExpectOnlyAffected(*pair.context, {1},
                       {absl::StatusCode::kUnavailable, absl::StatusCode::kAborted});
    ExpectOnlyAffected(*pair.generation, {1}, {absl::StatusCode::kUnavailable});
    for (Instance* side : {pair.context.get(), pair.generation.get()}) {
      for (const std::vector<Instance::Record>& records : side->records()) {
        for (const Instance::Record& r : records) {
          if (!r.error.ok()) {
            EXPECT_THAT(r.error.message(), HasSubstr("injected fault"));
          }
        }
      }
    }
  }
}

TEST(TransceiverFaultTest, OverlappingPoolsAreRefused) {
  RunOptions options = Options("loopback");
  options.plans = Plans(1, 6);
  ASSERT_OK_AND_ASSIGN(Pair pair, MakePair(options));
  transceiver::Transceiver& context = pair.context->rank(0).transceiver();
  transceiver::Transceiver& generation = pair.generation->rank(0).transceiver();
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<transfer::ControlChannel> mallory,
                       transfer::ControlChannel::Create({}));
  // A generation rank whose second pool starts inside its first: writes meant for
  // one would land in the other.
  transfer::RankInfo liar = generation.rank_info();
  liar.instance = "mallory";
  liar.control_address = mallory->address();
  ASSERT_GE(liar.page_table.pools.size(), 2u);
  liar.page_table.pools[1].base_address =
      liar.page_table.pools[0].base_address + liar.page_table.pools[0].slot_bytes;
  EXPECT_THAT(transfer::ValidatePageTable(liar.page_table),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("pools overlap")));
  ASSERT_OK(mallory->Send(context.control_address(),
                          transfer::EncodeMessage(transfer::RankInfoRequest{liar})));
  // Then a hello that is refused with an answer (it claims the context's role).
  // One peer's messages are handled in order: the first answer to come back is
  // this one's, so the overlapping table got none.
  transfer::RankInfo same_role = generation.rank_info();
  same_role.instance = "mallory";
  same_role.role = Role::kContext;
  same_role.control_address = mallory->address();
  ASSERT_OK(mallory->Send(context.control_address(),
                          transfer::EncodeMessage(transfer::RankInfoRequest{same_role})));
  std::vector<transfer::ControlChannel::Incoming> answers;
  const absl::Time patience = In(absl::Seconds(30));
  while (answers.empty() && absl::Now() < patience) {
    ASSERT_OK(mallory->Poll(In(absl::Milliseconds(100)), &answers));
  }
  ASSERT_FALSE(answers.empty());
  ASSERT_OK_AND_ASSIGN(transfer::Message answer, transfer::DecodeMessage(answers[0].bytes));
  const auto* reply = std::get_if<transfer::RankInfoReply>(&answer);
  ASSERT_NE(reply, nullptr);
  EXPECT_TRUE(reply->grants.empty());
  EXPECT_EQ(context.metrics().bad_messages, 1);
  EXPECT_EQ(context.metrics().handshakes, 1);  // the real generation rank's

  // A context rank answering with overlapping pools: the handshake is refused.
  std::thread answering([&] {
    std::vector<transfer::ControlChannel::Incoming> hello;
    const absl::Time until = In(absl::Seconds(30));
    while (hello.empty() && absl::Now() < until) {
      if (!mallory->Poll(In(absl::Milliseconds(100)), &hello).ok()) return;
    }
    if (hello.empty()) return;
    transfer::RankInfo bad = context.rank_info();
    bad.instance = "mallory";
    bad.control_address = mallory->address();
    bad.page_table.pools[0].base_address = bad.page_table.pools[1].base_address;
    (void)mallory->Send(hello[0].from,
                        transfer::EncodeMessage(transfer::RankInfoReply{bad, 1, {}, std::nullopt}));
  });
  EXPECT_THAT(generation.AddPeerInstance({mallory->address()}, In(absl::Seconds(2))),
              StatusIs(absl::StatusCode::kUnavailable));
  answering.join();
  EXPECT_EQ(generation.metrics().bad_messages, 1);

  // Neither side took the liar in; their own requests move.
  RunPair(pair, options.run_timeout);
  ExpectOnlyAffected(*pair.generation, {}, {});
  ExpectOnlyAffected(*pair.context, {}, {});
}

// The sweep catches what it is there to catch.
TEST(TransceiverFaultTest, CheckAtRestSeesAStrayByteAndAHeldSlot) {
  RunOptions options = Options("loopback");
  options.plans = Plans(1, 3);
  ASSERT_OK_AND_ASSIGN(Pair pair, MakePair(options));
  RunPair(pair, options.run_timeout);
  Instance& generation = *pair.generation;
  ASSERT_OK(generation.CheckAtRest());
  Rank& rank = generation.rank(0);
  const int64_t last = rank.table().pools[rank.layout().pool(1)].num_slots - 1;
  uint8_t* byte = rank.slot(1, last) + rank.layout().slot_bytes(1) - 1;
  *byte ^= 1;
  EXPECT_THAT(generation.CheckAtRest(),
              StatusIs(absl::StatusCode::kDataLoss,
                       HasSubstr(absl::StrCat("group=1 slot=", last, " offset="))));
  *byte ^= 1;
  ASSERT_OK(generation.CheckAtRest());
  ASSERT_OK(rank.manager().Allocate(99, 0, {{1, 0}, {0, 0}}).status());
  EXPECT_THAT(generation.CheckAtRest(),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("slots still taken")));
  ASSERT_OK(rank.manager().Release(99));
  EXPECT_OK(generation.CheckAtRest());
}

}  // namespace
}  // namespace kvx::harness

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const absl::string_view arg = argv[i];
    if (absl::StartsWith(arg, kvx::harness::kChildFlag)) {
      std::vector<std::string> addresses(argv + i + 1, argv + argc);
      return kvx::harness::ChildMain(arg.substr(kvx::harness::kChildFlag.size()), addresses);
    }
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
