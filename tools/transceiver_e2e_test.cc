// The transceiver end to end, every byte checked by the reference engine
// (tools/transceiver_harness.h): two instances of several ranks in this process,
// real control-plane sockets on 127.0.0.1, and the loopback backend or libfabric
// tcp;ofi_rxm on 127.0.0.1. The matrix: TP/PP mixes (replicated heads, uneven PP,
// attention DP, MLA), full, windowed and mixed groups, prefix hits of every size,
// chunked requests, cancels before/during/after by either side, either side first,
// and a corrupted write. Faults (a failed write, dying ranks, ...) are in
// transceiver_fault_test.cc.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/status_matchers.h"
#include "tools/transceiver_harness.h"
#include "transfer/session.h"
#include "transfer/transceiver/transceiver.h"
#include "transport/fault_injecting_transport.h"
#include "transport/forwarding_transport.h"
#include "transport/transport.h"

namespace kvx::harness {
namespace {

using ::testing::HasSubstr;
using transfer::SessionState;

// 4 layers: full {0, 2}, a 12-token window {1, 3}; 4 KV heads of 8 bf16; 4 tokens
// per block (one head of one block is 64 bytes).
ModelOptions Tiny(std::vector<std::optional<int64_t>> windows = {std::nullopt, 12}) {
  ModelOptions model;
  model.num_layers = 4;
  model.num_kv_heads = 4;
  model.head_size = 8;
  model.element_bytes = 2;
  model.tokens_per_block = 4;
  model.windows = std::move(windows);
  return model;
}

RequestPlan Cancelled(RequestPlan plan, CancelWhen when, Role side) {
  plan.cancel = when;
  plan.cancel_side = side;
  return plan;
}

// Every kind of request once (tokens per block 4, window 12): prefix hits of every
// size, chunks, stale heads kept or dropped, a draft block, cancels by either side.
std::vector<RequestPlan> Matrix(int64_t context_dp, int64_t generation_dp) {
  const std::vector<Chunk> three = {{0, 10}, {10, 40}, {40, 64}};
  std::vector<RequestPlan> plans = {
      MakePlan(1, 37),                                   // no hit
      MakePlan(2, 37, 3),                                // a hit inside the first block: none
      MakePlan(3, 37, 6),                                // a partial block: one block cached
      MakePlan(4, 37, 20),                               // whole blocks
      MakePlan(5, 37, 37),                               // the whole prompt but its last block
      MakePlan(6, 36, 36),                               // the whole prompt: nothing moves
      MakePlan(7, 1),                                    // one token
      MakePlan(8, 64, 0, three),                         // chunked
      MakePlan(9, 64, 17, three),                        // chunked behind a hit
      MakePlan(10, 64, 0, {{0, 12}, {12, 13}, {13, 64}}),  // a one-token chunk
      MakePlan(11, 100),
      MakePlan(12, 13, 4),
      Cancelled(MakePlan(13, 64), CancelWhen::kBefore, Role::kGeneration),
      Cancelled(MakePlan(14, 64), CancelWhen::kBefore, Role::kContext),
      Cancelled(MakePlan(15, 64, 0, three), CancelWhen::kDuring, Role::kGeneration),
      Cancelled(MakePlan(16, 64, 0, three), CancelWhen::kDuring, Role::kContext),
      Cancelled(MakePlan(17, 64), CancelWhen::kAfter, Role::kGeneration),
      Cancelled(MakePlan(18, 64, 8, three), CancelWhen::kAfter, Role::kContext),
  };
  plans[10].keep_stale = true;
  plans[10].draft_block = true;
  plans[11].draft_block = true;
  plans[4].keep_stale = true;
  for (size_t i = 0; i < plans.size(); ++i) {
    plans[i].context_dp_rank = static_cast<int64_t>(i) % context_dp;
    plans[i].generation_dp_rank = static_cast<int64_t>(i) % generation_dp;
  }
  return plans;
}

int64_t MustSucceed(absl::Span<const RequestPlan> plans) {
  int64_t n = 0;
  for (const RequestPlan& plan : plans) n += plan.may_be_cancelled() ? 0 : 1;
  return n;
}

RunOptions Options(const std::string& transport, ModelOptions model, Shape context,
                   Shape generation) {
  RunOptions options;
  options.model = std::move(model);
  options.context = std::move(context);
  options.generation = std::move(generation);
  options.transport.kind = transport;
  options.concurrency = 4;
  options.request_timeout = absl::Seconds(30);
  options.run_timeout = absl::Seconds(120);
  options.plans = Matrix(options.context.dp_size(), options.generation.dp_size());
  return options;
}

// Both sides clean: no failure, no wrong byte, no late write, and every request
// that no cancel can touch succeeded.
void ExpectClean(const RunReport& report, absl::Span<const RequestPlan> plans) {
  const std::string table = FormatTable(report.context, report.generation, report.seconds);
  for (const SideReport* side : {&report.context, &report.generation}) {
    SCOPED_TRACE(side->role);
    EXPECT_TRUE(side->ok()) << table;
    EXPECT_EQ(side->requests, static_cast<int64_t>(plans.size())) << table;
    EXPECT_EQ(side->succeeded + side->cancelled, side->requests) << table;
    EXPECT_GE(side->succeeded, MustSucceed(plans)) << table;
    EXPECT_EQ(side->metrics.bad_messages, 0);
  }
  EXPECT_GT(report.generation.bytes_checked, 0u);
}

struct Topology {
  const char* name;
  ModelOptions model;
  Shape context;
  Shape generation;
};

std::vector<Topology> Topologies() {
  ModelOptions two_heads = Tiny();
  two_heads.num_kv_heads = 2;
  ModelOptions mla = Tiny();
  mla.is_mla = true;
  return {
      {"Tp1ToTp1", Tiny(), Shape{1, 1, {}, false}, Shape{1, 1, {}, false}},
      {"Tp2ToTp1", Tiny(), Shape{2, 1, {}, false}, Shape{1, 1, {}, false}},
      {"Tp1ToTp2", Tiny(), Shape{1, 1, {}, false}, Shape{2, 1, {}, false}},
      {"ReplicatedContextTp4ToTp1", two_heads, Shape{4, 1, {}, false}, Shape{1, 1, {}, false}},
      {"Tp1ToReplicatedGenerationTp4", two_heads, Shape{1, 1, {}, false},
       Shape{4, 1, {}, false}},
      {"UnevenPp31ToPp13", Tiny(), Shape{1, 2, {3, 1}, false}, Shape{1, 2, {1, 3}, false}},
      {"Tp2Pp2ToTp1Pp2Uneven", Tiny(), Shape{2, 2, {}, false}, Shape{1, 2, {3, 1}, false}},
      {"FullAttentionOnly", Tiny({std::nullopt}), Shape{2, 1, {}, false},
       Shape{1, 1, {}, false}},
      {"WindowedOnly", Tiny({12}), Shape{2, 1, {}, false}, Shape{1, 1, {}, false}},
      {"AttentionDpBothSides", Tiny(), Shape{2, 1, {}, true}, Shape{2, 1, {}, true}},
      {"MlaTp2ToTp4", mla, Shape{2, 1, {}, false}, Shape{4, 1, {}, false}},
  };
}

class TransceiverMatrixTest
    : public ::testing::TestWithParam<std::tuple<std::string, Topology>> {};

TEST_P(TransceiverMatrixTest, EveryByteArrivesAndNothingElseMoves) {
  const auto& [transport, topology] = GetParam();
  RunOptions options = Options(transport, topology.model, topology.context, topology.generation);
  ASSERT_OK_AND_ASSIGN(RunReport report, RunInProcess(options));
  ExpectClean(report, options.plans);
  // Mixed groups skip both ways; hits skip on full-attention groups.
  if (topology.model.windows.size() == 2) {
    EXPECT_GT(report.generation.blocks_skipped_window, 0);
    EXPECT_GT(report.generation.blocks_skipped_reuse, 0);
  }
  EXPECT_GT(report.generation.blocks_sent, 0);
}

INSTANTIATE_TEST_SUITE_P(
    Transports, TransceiverMatrixTest,
    ::testing::Combine(::testing::Values("loopback", "tcp"), ::testing::ValuesIn(Topologies())),
    [](const ::testing::TestParamInfo<TransceiverMatrixTest::ParamType>& info) {
      return absl::StrCat(std::get<0>(info.param), "_", std::get<1>(info.param).name);
    });

// A random stream (pinned seed in BUILD): many requests, both transports.
class TransceiverStreamTest : public ::testing::TestWithParam<std::string> {};

TEST_P(TransceiverStreamTest, ARandomStreamIsCleanBothWays) {
  const uint64_t seed = ::testing::UnitTest::GetInstance()->random_seed();
  SCOPED_TRACE(absl::StrCat("seed=", seed));
  RunOptions options = Options(GetParam(), Tiny(), Shape{2, 1, {}, false}, Shape{1, 2, {}, false});
  options.plans.clear();
  options.workload.requests = 120;
  options.workload.seed = seed;
  options.workload.max_prompt = 200;
  options.workload.chunk_rate = 0.3;
  options.workload.cancel_rate = 0.2;
  options.concurrency = 8;
  ASSERT_OK_AND_ASSIGN(RunReport report, RunInProcess(options));
  EXPECT_TRUE(report.ok()) << FormatTable(report.context, report.generation, report.seconds);
  EXPECT_EQ(report.generation.requests, 120);
  EXPECT_EQ(report.generation.failed, 0);
}

INSTANTIATE_TEST_SUITE_P(Transports, TransceiverStreamTest, ::testing::Values("loopback", "tcp"));

// Two instances, driven step by step.
struct Pair {
  std::unique_ptr<Instance> context;
  std::unique_ptr<Instance> generation;
};

absl::StatusOr<Pair> MakePair(const RunOptions& options) {
  Pair pair;
  for (Role role : {Role::kContext, Role::kGeneration}) {
    absl::StatusOr<InstanceOptions> side = SideOptions(options, role);
    if (!side.ok()) return side.status();
    absl::StatusOr<std::unique_ptr<Instance>> instance =
        Instance::Create(*std::move(side), options.plans);
    if (!instance.ok()) return instance.status();
    (role == Role::kContext ? pair.context : pair.generation) = *std::move(instance);
  }
  absl::Status added = pair.generation->AddPeer(pair.context->control_addresses(),
                                                absl::Now() + absl::Seconds(30));
  if (!added.ok()) return added;
  return pair;
}

// True once every rank of `instance` reports every plan's request in `at_least` or
// later (the transceiver has no wait for another request's progress: poll).
bool WaitForState(Instance& instance, absl::Span<const RequestPlan> plans, SessionState at_least,
                  absl::Time deadline) {
  while (absl::Now() < deadline) {
    bool all = true;
    for (size_t r = 0; r < instance.num_ranks() && all; ++r) {
      for (const RequestPlan& plan : plans) {
        absl::StatusOr<transceiver::RequestStatus> status =
            instance.rank(r).transceiver().GetStatus(plan.rid);
        if (!status.ok() || status->state < at_least) {
          all = false;
          break;
        }
      }
    }
    if (all) return true;
    absl::SleepFor(absl::Milliseconds(2));
  }
  return false;
}

class TransceiverOrderTest : public ::testing::TestWithParam<std::string> {
 protected:
  // `first` issues every request before the other side starts: the generation
  // side until each request's data went out (READY), the context side until each
  // rank holds every task (INIT: waiting for request data).
  void RunWithFirst(Role first) {
    RunOptions options =
        Options(GetParam(), Tiny(), Shape{2, 1, {}, false}, Shape{1, 1, {}, false});
    options.concurrency = 64;  // every request at once
    ASSERT_OK_AND_ASSIGN(Pair pair, MakePair(options));
    Instance& early = first == Role::kContext ? *pair.context : *pair.generation;
    Instance& late = first == Role::kContext ? *pair.generation : *pair.context;
    const absl::Time deadline = absl::Now() + options.run_timeout;
    early.Start(deadline);
    std::vector<RequestPlan> waiting;
    for (const RequestPlan& plan : options.plans) {
      if (plan.cancel == CancelWhen::kNone) waiting.push_back(plan);
    }
    ASSERT_TRUE(WaitForState(early, waiting,
                             first == Role::kContext ? SessionState::kInit : SessionState::kReady,
                             absl::Now() + absl::Seconds(30)));
    late.Start(deadline);
    RunReport report;
    report.generation = pair.generation->Wait();
    report.context = pair.context->Wait();
    ExpectClean(report, options.plans);
  }
};

TEST_P(TransceiverOrderTest, GenerationSideFirst) { RunWithFirst(Role::kGeneration); }

TEST_P(TransceiverOrderTest, ContextSideFirst) { RunWithFirst(Role::kContext); }

INSTANTIATE_TEST_SUITE_P(Transports, TransceiverOrderTest, ::testing::Values("loopback", "tcp"));

// Completions held back, so each cancel lands while its transfer is in flight;
// then the same instances serve a clean stream, whose allocations check that
// nothing of the cancelled requests landed after they were final.
TEST(TransceiverFaultTest, CancelWhileTheWritesAreInFlight) {
  RunOptions options = Options("loopback", Tiny(), Shape{2, 1, {}, false}, Shape{1, 1, {}, false});
  options.plans.clear();
  for (uint64_t rid = 1; rid <= 8; ++rid) {
    options.plans.push_back(Cancelled(MakePlan(rid, 64, 0, {{0, 30}, {30, 64}}), CancelWhen::kDuring,
                                      rid % 2 == 0 ? Role::kContext : Role::kGeneration));
  }
  options.concurrency = 8;
  options.transport.wrap = [](std::unique_ptr<transport::Transport> inner, int64_t) {
    auto faulty = std::make_unique<transport::FaultInjectingTransport>(std::move(inner));
    faulty->DelayCompletions(absl::Milliseconds(300));
    return std::unique_ptr<transport::Transport>(std::move(faulty));
  };
  ASSERT_OK_AND_ASSIGN(Pair pair, MakePair(options));
  pair.context->Start(absl::Now() + options.run_timeout);
  pair.generation->Start(absl::Now() + options.run_timeout);
  RunReport report;
  report.generation = pair.generation->Wait();
  report.context = pair.context->Wait();
  const std::string table = FormatTable(report.context, report.generation, report.seconds);
  EXPECT_TRUE(report.ok()) << table;
  EXPECT_EQ(report.generation.cancelled, 8) << table;
  EXPECT_EQ(report.context.cancelled, 8) << table;

  std::vector<RequestPlan> after;
  for (uint64_t rid = 101; rid <= 116; ++rid) after.push_back(MakePlan(rid, 64, 0));
  pair.context->Reset(after);
  pair.generation->Reset(after);
  pair.context->Start(absl::Now() + options.run_timeout);
  pair.generation->Start(absl::Now() + options.run_timeout);
  report.generation = pair.generation->Wait();
  report.context = pair.context->Wait();
  ExpectClean(report, after);
  EXPECT_EQ(report.generation.succeeded, 16);
}

// A transport that lands the first write of each transfer 8 bytes further on: the
// checks must see it (they cannot pass by accident).
class Misdirecting final : public transport::ForwardingTransport {
 public:
  using ForwardingTransport::ForwardingTransport;
  absl::StatusOr<transport::TransferId> PostWrites(transport::PeerId peer,
                                                   absl::Span<const transport::WriteOp> writes,
                                                   absl::Time deadline) override {
    std::vector<transport::WriteOp> moved(writes.begin(), writes.end());
    if (moved[0].remote_offset + moved[0].length + 8 <= moved[0].remote.length) {
      moved[0].remote_offset += 8;
    }
    return inner().PostWrites(peer, moved, deadline);
  }
};

TEST(TransceiverFaultTest, MisplacedBytesAreCaught) {
  RunOptions options = Options("loopback", Tiny(), Shape{1, 1, {}, false}, Shape{1, 1, {}, false});
  options.plans = {MakePlan(1, 40), MakePlan(2, 40, 16)};
  options.transport.wrap = [](std::unique_ptr<transport::Transport> inner, int64_t) {
    return std::unique_ptr<transport::Transport>(std::make_unique<Misdirecting>(std::move(inner)));
  };
  ASSERT_OK_AND_ASSIGN(RunReport report, RunInProcess(options));
  EXPECT_FALSE(report.ok());
  EXPECT_EQ(report.generation.mismatches, 2);
  ASSERT_FALSE(report.generation.failures.empty());
  EXPECT_THAT(report.generation.failures[0], HasSubstr("expected="));
}

}  // namespace
}  // namespace kvx::harness
