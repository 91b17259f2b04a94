// The transceiver end to end in one process, over the loopback transport: two
// instances of ranks, real control-plane sockets on 127.0.0.1, real slices from the
// V2 adapter over fake cache managers, and every byte checked.

#include "transfer/transceiver/transceiver.h"

#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "cache_reuse/adapter.h"
#include "cache_reuse/v2_adapter.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/fake_cache_managers.h"
#include "testing/status_matchers.h"
#include "transfer/control_security.h"
#include "transfer/page_table.h"
#include "transfer/protocol.h"
#include "transfer/scenario.h"
#include "transfer/session.h"
#include "transfer/slice.h"
#include "transfer/topology.h"
#include "transfer/control_channel.h"
#include "transport/fault_injecting_transport.h"
#include "transport/loopback/loopback_transport.h"
#include "transport/transport.h"
#include "zmq.hpp"

namespace kvx::transceiver {
namespace {

using ::kvx::testing::StatusIs;
using ::testing::ElementsAre;

constexpr unsigned char kGuard = 0xEE;
constexpr int64_t kSlots = 64;

absl::Time In(absl::Duration d) { return absl::Now() + d; }

// The context engine's task for a request (or one chunk of it).
ContextRequest Task(uint64_t rid, int64_t prompt_len, int64_t slice_id = 0,
                    std::optional<transfer::TokenRange> range = std::nullopt,
                    std::vector<int64_t> aux = {}) {
  ContextRequest task;
  task.unique_rid = rid;
  task.prompt_len = prompt_len;
  task.slice_id = slice_id;
  task.token_range = range;
  task.aux_tokens = std::move(aux);
  return task;
}

// Two layers, two KV heads of size 2 in bf16, 4 tokens per block: one K or V head
// of one block is 16 bytes.
transfer::ModelSpec Model() {
  transfer::ModelSpec model;
  model.num_layers = 2;
  model.num_kv_heads = 2;
  model.head_size = 2;
  model.element_bytes = 2;
  model.tokens_per_block = 4;
  model.groups = {transfer::GroupSpec{std::nullopt, transfer::AllLayers(2)}};
  return model;
}

// One rank: its KV memory (pools back to back), cache manager and transceiver.
struct Rank {
  std::vector<unsigned char> memory;
  transfer::RankPageTable table;
  kvx::testing::FakePagedCacheManager manager;
  std::unique_ptr<cache_reuse::V2Adapter> adapter;
  std::unique_ptr<Transceiver> transceiver;

  uint64_t slot_bytes() const { return table.pools[0].slot_bytes; }
  unsigned char* slot(int64_t id) { return memory.data() + slot_bytes() * id; }
};

std::unique_ptr<Rank> MakeRank(const std::string& instance, Role role,
                               const transfer::Topology& topology,
                               TransportFactory create_transport = nullptr,
                               const TransceiverOptions::Staging* staging = nullptr,
                               const transfer::ControlSecurity& security = {},
                               const std::function<void(TransceiverOptions*)>& adjust = nullptr) {
  auto rank = std::make_unique<Rank>();
  absl::StatusOr<transfer::RankPageTable> probe =
      transfer::BuildStandardPageTable(Model(), topology, kSlots, 0x10000);
  EXPECT_OK(probe.status());
  if (!probe.ok()) return nullptr;
  uint64_t bytes = 0;
  for (const transfer::Pool& pool : probe->pools) {
    bytes = std::max(bytes, pool.base_address - 0x10000 + pool.slot_bytes * pool.num_slots);
  }
  rank->memory.assign(bytes, kGuard);
  absl::StatusOr<transfer::RankPageTable> table = transfer::BuildStandardPageTable(
      Model(), topology, kSlots, reinterpret_cast<uint64_t>(rank->memory.data()));
  EXPECT_OK(table.status());
  if (!table.ok()) return nullptr;
  rank->table = *table;
  rank->adapter = std::make_unique<cache_reuse::V2Adapter>(&rank->manager,
                                                           cache_reuse::ReuseOptions{true});
  RankSetup setup;
  setup.page_table = rank->table;
  setup.adapter = rank->adapter.get();
  setup.create_transport = create_transport != nullptr
                               ? std::move(create_transport)
                               : [](const transport::EndpointOptions& options) {
                                   return transport::CreateLoopbackTransport(options);
                                 };
  TransceiverOptions options;
  options.instance = instance;
  options.role = role;
  options.default_request_timeout = absl::Seconds(20);
  options.report_grace = absl::Milliseconds(500);
  if (staging != nullptr) options.staging = *staging;
  options.control_security = security;
  if (adjust) adjust(&options);
  absl::StatusOr<std::unique_ptr<Transceiver>> t = Transceiver::Create(options, std::move(setup));
  EXPECT_OK(t.status());
  if (!t.ok()) return nullptr;
  rank->transceiver = *std::move(t);
  return rank;
}

// A deterministic byte of request `rid`, slot `slot`, offset `i`.
unsigned char Pattern(uint64_t rid, int64_t slot, uint64_t i) {
  return static_cast<unsigned char>((rid * 131 + slot * 29 + i * 7 + 1) & 0xff);
}

void Fill(Rank& rank, uint64_t rid, const std::vector<int64_t>& slots) {
  for (int64_t slot : slots) {
    for (uint64_t i = 0; i < rank.slot_bytes(); ++i) rank.slot(slot)[i] = Pattern(rid, slot, i);
  }
}

// Identical layouts copy whole slots: generation slot dst[i] must hold what context
// slot src[i] held.
::testing::AssertionResult SameSlots(Rank& generation, const std::vector<int64_t>& dst,
                                     Rank& context, const std::vector<int64_t>& src) {
  for (size_t i = 0; i < dst.size(); ++i) {
    if (std::memcmp(generation.slot(dst[i]), context.slot(src[i]), generation.slot_bytes()) != 0) {
      return ::testing::AssertionFailure()
             << "slot " << dst[i] << " differs from source slot " << src[i] << ": first bytes "
             << int{generation.slot(dst[i])[0]} << " vs " << int{context.slot(src[i])[0]};
    }
  }
  return ::testing::AssertionSuccess();
}

bool Untouched(Rank& rank, int64_t slot) {
  for (uint64_t i = 0; i < rank.slot_bytes(); ++i) {
    if (rank.slot(slot)[i] != kGuard) return false;
  }
  return true;
}

class TransceiverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    context_ = MakeRank("prefill", Role::kContext, transfer::MakeTopology(1, {2}));
    generation_ = MakeRank("decode", Role::kGeneration, transfer::MakeTopology(1, {2}));
    ASSERT_NE(context_, nullptr);
    ASSERT_NE(generation_, nullptr);
    ASSERT_OK(generation_->transceiver->AddPeerInstance({context_->transceiver->control_address()},
                                                        In(absl::Seconds(10))));
  }

  RequestStatus OneGen() {
    std::vector<RequestStatus> done =
        generation_->transceiver->CheckGenTransferStatus(1, In(absl::Seconds(30)));
    EXPECT_EQ(done.size(), 1u);
    return done.empty() ? RequestStatus{} : done[0];
  }
  RequestStatus OneContext() {
    std::vector<RequestStatus> done =
        context_->transceiver->CheckContextTransferStatus(1, In(absl::Seconds(30)));
    EXPECT_EQ(done.size(), 1u);
    return done.empty() ? RequestStatus{} : done[0];
  }

  std::unique_ptr<Rank> context_;
  std::unique_ptr<Rank> generation_;
};

TEST_F(TransceiverTest, OneRequestMovesEveryByteAndItsAuxTokens) {
  const uint64_t rid = 17;
  context_->manager.AddRequestFromTables(rid, std::nullopt, {{0, 1, 2, 3}});
  generation_->manager.AddRequestFromTables(rid, std::nullopt, {{10, 11, 12, 13}});
  Fill(*context_, rid, {0, 1, 2, 3});
  GenerationRequest receive;
  receive.unique_rid = rid;
  receive.prompt_len = 16;
  receive.context_instance = "prefill";
  ASSERT_OK(generation_->transceiver->RequestAndReceiveAsync(receive));
  ContextRequest send;
  send.unique_rid = rid;
  send.prompt_len = 16;
  send.aux_tokens = {42, 7};
  ASSERT_OK(context_->transceiver->RespondAndSendAsync(send));

  const RequestStatus got = OneGen();
  EXPECT_EQ(got.state, SessionState::kFullyTransferred) << got.error;
  EXPECT_THAT(got.aux_tokens, ElementsAre(42, 7));
  EXPECT_OK(got.commit);
  EXPECT_TRUE(generation_->manager.committed(rid));
  const RequestStatus sent = OneContext();
  EXPECT_EQ(sent.state, SessionState::kFullyTransferred) << sent.error;
  EXPECT_EQ(sent.metrics.bytes, 4 * context_->slot_bytes());
  EXPECT_EQ(sent.metrics.writes, 1);  // Four contiguous slots coalesce into one write.
  EXPECT_TRUE(SameSlots(*generation_, {10, 11, 12, 13}, *context_, {0, 1, 2, 3}));
  for (int64_t slot : {0, 9, 14, 63}) EXPECT_TRUE(Untouched(*generation_, slot)) << slot;
}

// The gauges a soak run watches for leaks: a request is live from the engine's call
// until it is collected, and once collected no session of it is held on either side.
TEST_F(TransceiverTest, GaugesCountARequestUntilItIsCollected) {
  const uint64_t rid = 23;
  context_->manager.AddRequestFromTables(rid, std::nullopt, {{0, 1}});
  generation_->manager.AddRequestFromTables(rid, std::nullopt, {{10, 11}});
  GenerationRequest receive;
  receive.unique_rid = rid;
  receive.prompt_len = 8;
  receive.context_instance = "prefill";
  ASSERT_OK(generation_->transceiver->RequestAndReceiveAsync(receive));
  EXPECT_EQ(generation_->transceiver->metrics().live_requests, 1);
  ASSERT_OK(context_->transceiver->RespondAndSendAsync(Task(rid, 8)));
  EXPECT_EQ(context_->transceiver->metrics().live_requests, 1);
  EXPECT_EQ(OneGen().state, SessionState::kFullyTransferred);
  EXPECT_EQ(OneContext().state, SessionState::kFullyTransferred);
  for (Rank* rank : {context_.get(), generation_.get()}) {
    const TransceiverMetrics m = rank->transceiver->metrics();
    EXPECT_EQ(m.live_requests, 0);
    EXPECT_EQ(m.sessions, 0);
    EXPECT_EQ(m.remembered_cancels, 0);
  }

  // A cancelled request is remembered (for receivers that ask later), and only so.
  const uint64_t cancelled = 24;
  context_->manager.AddRequestFromTables(cancelled, std::nullopt, {{2, 3}});
  ASSERT_OK(context_->transceiver->RespondAndSendAsync(Task(cancelled, 8)));
  ASSERT_OK(context_->transceiver->CancelRequest(cancelled));
  EXPECT_EQ(OneContext().state, SessionState::kCancelled);
  const TransceiverMetrics m = context_->transceiver->metrics();
  EXPECT_EQ(m.live_requests, 0);
  EXPECT_EQ(m.sessions, 0);
  EXPECT_EQ(m.remembered_cancels, 1);
}

// Found by `transceiver demo --soak` (issue 11): request data for a request the
// context engine has not started opens a session; when the generation side cancels
// it, it ends before any engine task claims it and is let go cancel_memory after it
// ended, on a timer. Once enough other requests had ended, the rank thread rebuilt
// its timer queue without that timer, and the session stayed for good: one leaked
// session per such request.
TEST(TransceiverTimersTest, AnUnclaimedSessionIsLetGoAfterTheTimersAreRebuilt) {
  auto adjust = [](TransceiverOptions* options) {
    options->cancel_memory = absl::Seconds(5);
    options->request_data_ttl = absl::Minutes(10);  // the timer the rebuild kept
  };
  std::unique_ptr<Rank> context = MakeRank("prefill", Role::kContext, transfer::MakeTopology(1, {2}),
                                           nullptr, nullptr, {}, adjust);
  std::unique_ptr<Rank> generation =
      MakeRank("decode", Role::kGeneration, transfer::MakeTopology(1, {2}), nullptr, nullptr, {}, adjust);
  ASSERT_NE(context, nullptr);
  ASSERT_NE(generation, nullptr);
  ASSERT_OK(generation->transceiver->AddPeerInstance({context->transceiver->control_address()},
                                                     In(absl::Seconds(10))));
  // The gauge follows on the rank thread's pass (no notification: look every 10 ms).
  auto wait_for_sessions = [&context](int64_t n, absl::Time deadline) {
    while (context->transceiver->metrics().sessions != n && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(10));
    }
    return context->transceiver->metrics().sessions;
  };
  // The generation side asks for request 1, which the context engine has not
  // started, and cancels it: the context rank's session, which its request data
  // opened, ends before any task claims it and is kept for cancel_memory.
  GenerationRequest receive;
  receive.prompt_len = 4;
  receive.context_instance = "prefill";
  generation->manager.AddRequestFromTables(1, std::nullopt, {{0}});
  receive.unique_rid = 1;
  ASSERT_OK(generation->transceiver->RequestAndReceiveAsync(receive));
  ASSERT_EQ(wait_for_sessions(1, In(absl::Seconds(30))), 1);
  ASSERT_OK(generation->transceiver->CancelRequest(1));
  // Final once the context rank answered the cancel: its session has ended.
  std::vector<RequestStatus> done =
      generation->transceiver->CheckGenTransferStatus(1, In(absl::Seconds(30)));
  ASSERT_EQ(done.size(), 1u);
  EXPECT_EQ(done[0].state, SessionState::kCancelled);
  EXPECT_EQ(context->transceiver->metrics().sessions, 1);  // the unclaimed one
  // 640 requests end, leaving more than 1024 stale timers on the context rank
  // (each its deadline and its request-data bound): the queue is rebuilt.
  for (uint64_t round = 0; round < 10; ++round) {
    for (int64_t i = 0; i < kSlots; ++i) {
      const uint64_t rid = 1000 + round * kSlots + i;
      context->manager.AddRequestFromTables(rid, std::nullopt, {{i}});
      generation->manager.AddRequestFromTables(rid, std::nullopt, {{i}});
      receive.unique_rid = rid;
      ASSERT_OK(generation->transceiver->RequestAndReceiveAsync(receive));
      ASSERT_OK(context->transceiver->RespondAndSendAsync(Task(rid, 4)));
    }
    const absl::Time round_deadline = In(absl::Seconds(60));
    for (size_t gen = 0, ctx = 0; gen < kSlots || ctx < kSlots;) {
      gen += generation->transceiver->CheckGenTransferStatus(0, In(absl::Milliseconds(10))).size();
      ctx += context->transceiver->CheckContextTransferStatus(0, In(absl::Milliseconds(10))).size();
      ASSERT_LT(absl::Now(), round_deadline) << "round=" << round << " gen=" << gen << " ctx=" << ctx;
    }
  }
  // The unclaimed session goes cancel_memory after it ended, not request_data_ttl
  // after it opened.
  EXPECT_EQ(wait_for_sessions(0, In(absl::Seconds(20))), 0);
}

TEST_F(TransceiverTest, PrefixHitMovesOnlyWhatTheGenerationSideLacks) {
  const uint64_t rid = 18;
  context_->manager.AddRequestFromTables(rid, std::nullopt, {{0, 1, 2, 3}});
  // The generation side holds the first two blocks already (8 committed tokens).
  generation_->manager.AddRequestFromTables(rid, 8, {{20, 21, 22, 23}});
  Fill(*context_, rid, {0, 1, 2, 3});
  ASSERT_OK(context_->transceiver->RespondAndSendAsync(Task(rid, 16)));
  GenerationRequest receive;
  receive.unique_rid = rid;
  receive.prompt_len = 16;
  receive.context_instance = "prefill";
  ASSERT_OK(generation_->transceiver->RequestAndReceiveAsync(receive));
  EXPECT_EQ(OneGen().state, SessionState::kFullyTransferred);
  const RequestStatus sent = OneContext();
  EXPECT_EQ(sent.metrics.blocks, 2);
  EXPECT_EQ(sent.metrics.blocks_skipped, 2);
  EXPECT_TRUE(SameSlots(*generation_, {22, 23}, *context_, {2, 3}));
  EXPECT_TRUE(Untouched(*generation_, 20));
  EXPECT_TRUE(Untouched(*generation_, 21));
}

TEST_F(TransceiverTest, ChunkedRequestCompletesWithTheLastSlice) {
  const uint64_t rid = 19;
  context_->manager.AddRequestFromTables(rid, std::nullopt, {{0, 1, 2, 3}});
  generation_->manager.AddRequestFromTables(rid, std::nullopt, {{30, 31, 32, 33}});
  Fill(*context_, rid, {0, 1, 2, 3});
  GenerationRequest receive;
  receive.unique_rid = rid;
  receive.prompt_len = 16;
  receive.context_instance = "prefill";
  receive.slices = {transfer::TokenRange::Create(0, 6).value(),
                    transfer::TokenRange::Create(6, 16).value()};
  ASSERT_OK(generation_->transceiver->RequestAndReceiveAsync(receive));
  ContextRequest first = Task(rid, 16, 0, transfer::TokenRange::Create(0, 6).value());
  ASSERT_OK(context_->transceiver->RespondAndSendAsync(first));
  ContextRequest second = Task(rid, 16, 1, transfer::TokenRange::Create(6, 16).value(), {5});
  ASSERT_OK(context_->transceiver->RespondAndSendAsync(second));
  const RequestStatus got = OneGen();
  EXPECT_EQ(got.state, SessionState::kFullyTransferred) << got.error;
  EXPECT_THAT(got.aux_tokens, ElementsAre(5));
  EXPECT_TRUE(SameSlots(*generation_, {30, 31, 32, 33}, *context_, {0, 1, 2, 3}));
  // Chunk 1 resends only the block its first token completes (block 1) and after.
  EXPECT_EQ(OneContext().metrics.blocks, 2 + 3);
}

TEST_F(TransceiverTest, CancelBeforeTheContextSideKnowsTheRequest) {
  const uint64_t rid = 20;
  context_->manager.AddRequestFromTables(rid, std::nullopt, {{0, 1, 2, 3}});
  generation_->manager.AddRequestFromTables(rid, std::nullopt, {{40, 41, 42, 43}});
  GenerationRequest receive;
  receive.unique_rid = rid;
  receive.prompt_len = 16;
  receive.context_instance = "prefill";
  ASSERT_OK(generation_->transceiver->RequestAndReceiveAsync(receive));
  ASSERT_OK(generation_->transceiver->CancelRequest(rid));
  const RequestStatus got = OneGen();
  EXPECT_EQ(got.state, SessionState::kCancelled);
  // The context engine's task comes later: it ends cancelled and writes nothing.
  ASSERT_OK(context_->transceiver->RespondAndSendAsync(Task(rid, 16)));
  const RequestStatus sent = OneContext();
  EXPECT_THAT(sent.state, ::testing::AnyOf(SessionState::kCancelled, SessionState::kError));
  for (int64_t slot : {40, 41, 42, 43}) EXPECT_TRUE(Untouched(*generation_, slot));
}

TEST_F(TransceiverTest, ContextSideThatNeverComesTimesOutOnBothSides) {
  const uint64_t rid = 21;
  generation_->manager.AddRequestFromTables(rid, std::nullopt, {{0, 1, 2, 3}});
  GenerationRequest receive;
  receive.unique_rid = rid;
  receive.prompt_len = 16;
  receive.context_instance = "prefill";
  receive.timeout = absl::Milliseconds(300);
  ASSERT_OK(generation_->transceiver->RequestAndReceiveAsync(receive));
  const RequestStatus got = OneGen();
  EXPECT_EQ(got.state, SessionState::kError);
  EXPECT_THAT(got.error, StatusIs(absl::StatusCode::kDeadlineExceeded));
}

// Found by `transceiver demo` (issue 9): a request the context engine cancelled
// before the generation side asked for it was forgotten once final, so the
// generation side's request data later waited for an engine task that never comes
// and the generation side hung until its own timeout.
TEST_F(TransceiverTest, ContextCancelBeforeTheGenerationSideAsksEndsItPromptly) {
  for (const bool cancel_first : {true, false}) {
    SCOPED_TRACE(cancel_first ? "cancel, then the engine's task" : "task, then cancel");
    const uint64_t rid = cancel_first ? 22 : 23;
    context_->manager.AddRequestFromTables(rid, std::nullopt, {{0, 1, 2, 3}});
    generation_->manager.AddRequestFromTables(rid, std::nullopt, {{50, 51, 52, 53}});
    ContextRequest send;
    send.unique_rid = rid;
    send.prompt_len = 16;
    if (cancel_first) ASSERT_OK(context_->transceiver->CancelRequest(rid));
    ASSERT_OK(context_->transceiver->RespondAndSendAsync(send));
    if (!cancel_first) ASSERT_OK(context_->transceiver->CancelRequest(rid));
    EXPECT_EQ(OneContext().state, SessionState::kCancelled);
    GenerationRequest receive;
    receive.unique_rid = rid;
    receive.prompt_len = 16;
    receive.context_instance = "prefill";
    ASSERT_OK(generation_->transceiver->RequestAndReceiveAsync(receive));
    // Far less than the request's 20 s timeout: the context side answers at once.
    std::vector<RequestStatus> got =
        generation_->transceiver->CheckGenTransferStatus(1, In(absl::Seconds(5)));
    ASSERT_EQ(got.size(), 1u) << "the generation side was never told of the cancel";
    EXPECT_TRUE(got[0].final());
    EXPECT_NE(got[0].state, SessionState::kFullyTransferred);
    EXPECT_THAT(got[0].error, StatusIs(absl::StatusCode::kAborted));
    for (int64_t slot : {50, 51, 52, 53}) EXPECT_TRUE(Untouched(*generation_, slot));
  }
}

// Found by the soak (issue 11): a chunked request failed while its next slice was
// being sent; that slice opened a second session whose final status came after the
// engine was done with the request and was never collected (live_requests stayed
// 1). A slice of a request whose final status waits to be collected is refused.
TEST_F(TransceiverTest, ASliceOfARequestThatEndedIsRefused) {
  const uint64_t rid = 25;
  context_->manager.AddRequestFromTables(rid, std::nullopt, {{0, 1, 2, 3}});
  ASSERT_OK(context_->transceiver->RespondAndSendAsync(
      Task(rid, 16, 0, transfer::TokenRange::Create(0, 8).value())));
  ASSERT_OK(context_->transceiver->CancelRequest(rid));
  // Final once it left the requests in flight (GetStatus: NotFound), not collected.
  const absl::Time deadline = In(absl::Seconds(30));
  while (context_->transceiver->GetStatus(rid).ok() && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_THAT(context_->transceiver->RespondAndSendAsync(
                  Task(rid, 16, 1, transfer::TokenRange::Create(8, 16).value())),
              StatusIs(absl::StatusCode::kFailedPrecondition, ::testing::HasSubstr("already ended")));
  EXPECT_EQ(OneContext().state, SessionState::kCancelled);
  EXPECT_EQ(context_->transceiver->metrics().live_requests, 0);
}

// The sessions gauge counts what a rank keeps books on, request data that waits for
// the engine's task included (no status shows it), and drops to zero once the
// request ended on both sides.
TEST_F(TransceiverTest, SessionsGaugeCountsRequestDataWaitingForItsTask) {
  const uint64_t rid = 24;
  context_->manager.AddRequestFromTables(rid, std::nullopt, {{0, 1, 2, 3}});
  generation_->manager.AddRequestFromTables(rid, std::nullopt, {{4, 5, 6, 7}});
  EXPECT_EQ(context_->transceiver->metrics().sessions, 0);
  GenerationRequest receive;
  receive.unique_rid = rid;
  receive.prompt_len = 16;
  receive.context_instance = "prefill";
  ASSERT_OK(generation_->transceiver->RequestAndReceiveAsync(receive));
  // A gauge cannot be awaited: poll both (each rank publishes its own at the end of
  // its thread's pass: the context rank may count the request data first).
  const absl::Time give_up = In(absl::Seconds(10));
  while ((context_->transceiver->metrics().sessions < 1 ||
          generation_->transceiver->metrics().sessions < 1) &&
         absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  EXPECT_EQ(context_->transceiver->metrics().sessions, 1);
  EXPECT_THAT(context_->transceiver->GetStatus(rid), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(generation_->transceiver->metrics().sessions, 1);
  ASSERT_OK(context_->transceiver->RespondAndSendAsync(Task(rid, 16)));
  EXPECT_EQ(OneGen().state, SessionState::kFullyTransferred);
  EXPECT_EQ(OneContext().state, SessionState::kFullyTransferred);
  // Final requests left the books before they were reported.
  EXPECT_EQ(context_->transceiver->metrics().sessions, 0);
  EXPECT_EQ(generation_->transceiver->metrics().sessions, 0);
}

TEST_F(TransceiverTest, WholePromptCachedStillCompletes) {
  const uint64_t rid = 22;
  context_->manager.AddRequestFromTables(rid, std::nullopt, {{0, 1, 2, 3}});
  generation_->manager.AddRequestFromTables(rid, 16, {{50, 51, 52, 53}});
  ASSERT_OK(context_->transceiver->RespondAndSendAsync(Task(rid, 16, 0, std::nullopt, {3})));
  GenerationRequest receive;
  receive.unique_rid = rid;
  receive.prompt_len = 16;
  receive.context_instance = "prefill";
  ASSERT_OK(generation_->transceiver->RequestAndReceiveAsync(receive));
  const RequestStatus got = OneGen();
  EXPECT_EQ(got.state, SessionState::kFullyTransferred) << got.error;
  EXPECT_THAT(got.aux_tokens, ElementsAre(3));
  EXPECT_EQ(OneContext().metrics.bytes, 0u);
  for (int64_t slot : {50, 51, 52, 53}) EXPECT_TRUE(Untouched(*generation_, slot));
}

TEST_F(TransceiverTest, HandshakesRepeatFromEitherSide) {
  // Added again from the generation side, and from the context side: nothing changes
  // and requests still flow.
  ASSERT_OK(generation_->transceiver->AddPeerInstance({context_->transceiver->control_address()},
                                                      In(absl::Seconds(10))));
  ASSERT_OK(context_->transceiver->AddPeerInstance({generation_->transceiver->control_address()},
                                                   In(absl::Seconds(10))));
  const uint64_t rid = 23;
  context_->manager.AddRequestFromTables(rid, std::nullopt, {{4, 5, 6, 7}});
  generation_->manager.AddRequestFromTables(rid, std::nullopt, {{54, 55, 56, 57}});
  Fill(*context_, rid, {4, 5, 6, 7});
  ASSERT_OK(context_->transceiver->RespondAndSendAsync(Task(rid, 16)));
  GenerationRequest receive;
  receive.unique_rid = rid;
  receive.prompt_len = 16;
  receive.context_instance = "prefill";
  ASSERT_OK(generation_->transceiver->RequestAndReceiveAsync(receive));
  EXPECT_EQ(OneGen().state, SessionState::kFullyTransferred);
  EXPECT_TRUE(SameSlots(*generation_, {54, 55, 56, 57}, *context_, {4, 5, 6, 7}));
  EXPECT_EQ(generation_->transceiver->metrics().fences, 0);
}

TEST(TransceiverContextFirstTest, ContextSideHandshakeIsEnoughForBoth) {
  std::unique_ptr<Rank> context = MakeRank("prefill", Role::kContext, transfer::MakeTopology(1, {2}));
  std::unique_ptr<Rank> generation =
      MakeRank("decode", Role::kGeneration, transfer::MakeTopology(1, {2}));
  ASSERT_OK(context->transceiver->AddPeerInstance({generation->transceiver->control_address()},
                                                  In(absl::Seconds(10))));
  context->manager.AddRequestFromTables(1, std::nullopt, {{0, 1}});
  generation->manager.AddRequestFromTables(1, std::nullopt, {{2, 3}});
  Fill(*context, 1, {0, 1});
  GenerationRequest receive;
  receive.unique_rid = 1;
  receive.prompt_len = 8;
  receive.context_instance = "prefill";
  ASSERT_OK(generation->transceiver->RequestAndReceiveAsync(receive));
  ASSERT_OK(context->transceiver->RespondAndSendAsync(Task(1, 8, 0, std::nullopt)));
  std::vector<RequestStatus> done =
      generation->transceiver->CheckGenTransferStatus(1, In(absl::Seconds(30)));
  ASSERT_EQ(done.size(), 1u);
  EXPECT_EQ(done[0].state, SessionState::kFullyTransferred) << done[0].error;
  EXPECT_TRUE(SameSlots(*generation, {2, 3}, *context, {0, 1}));
}

// A sender whose writes fail without it knowing whether they landed (a lost
// connection) reports unsettled; the receiver fences it before the request is final,
// gives it fresh grants, and the next request works (its writes direct, or staged).
// Loopback endpoints wrapped in a FaultInjectingTransport, left at `*faults`.
TransportFactory Faulty(transport::FaultInjectingTransport** faults) {
  return [faults](const transport::EndpointOptions& options)
             -> absl::StatusOr<std::unique_ptr<transport::Transport>> {
    absl::StatusOr<std::unique_ptr<transport::Transport>> inner =
        transport::CreateLoopbackTransport(options);
    if (!inner.ok()) return inner.status();
    auto wrapped = std::make_unique<transport::FaultInjectingTransport>(*std::move(inner));
    *faults = wrapped.get();
    return wrapped;
  };
}

// A context rank over a FaultInjectingTransport and a generation rank, both with
// `staging`, and request 1 (two writes: staged when staging is on) posted with its
// completions held back.
struct HeldRequest {
  transport::FaultInjectingTransport* faults = nullptr;
  std::unique_ptr<Rank> context;
  std::unique_ptr<Rank> generation;
};

void StartHeldRequest(const TransceiverOptions::Staging& staging, HeldRequest* held) {
  held->context = MakeRank("prefill", Role::kContext, transfer::MakeTopology(1, {2}),
                           Faulty(&held->faults), &staging);
  held->generation =
      MakeRank("decode", Role::kGeneration, transfer::MakeTopology(1, {2}), nullptr, &staging);
  ASSERT_NE(held->faults, nullptr);
  Rank& context = *held->context;
  Rank& generation = *held->generation;
  ASSERT_OK(generation.transceiver->AddPeerInstance({context.transceiver->control_address()},
                                                    In(absl::Seconds(10))));
  context.manager.AddRequestFromTables(1, std::nullopt, {{0, 2}});  // two writes
  generation.manager.AddRequestFromTables(1, std::nullopt, {{1, 3}});
  held->faults->DelayCompletions(absl::Hours(1));  // Its writes never report...
  ASSERT_OK(context.transceiver->RespondAndSendAsync(Task(1, 8, 0, std::nullopt)));
  GenerationRequest receive;
  receive.unique_rid = 1;
  receive.prompt_len = 8;
  receive.context_instance = "prefill";
  ASSERT_OK(generation.transceiver->RequestAndReceiveAsync(receive));
  ASSERT_TRUE(absl::IsNotFound(generation.transceiver->GetStatus(99).status()));
  // ... once posted (the sender says TRANSFERRING once its writes are queued).
  const absl::Time give_up = In(absl::Seconds(20));
  absl::StatusOr<RequestStatus> sending = context.transceiver->GetStatus(1);
  while (sending.ok() && sending->state < SessionState::kTransferring && absl::Now() < give_up) {
    context.transceiver->CheckContextTransferStatus(1, In(absl::Milliseconds(5)));
    sending = context.transceiver->GetStatus(1);
  }
  ASSERT_OK(sending.status());
  ASSERT_EQ(sending->state, SessionState::kTransferring);
}

// Request 2 moves every byte.
void ExpectTheNextRequestFlows(HeldRequest& held) {
  Rank& context = *held.context;
  Rank& generation = *held.generation;
  context.manager.AddRequestFromTables(2, std::nullopt, {{4, 6}});
  generation.manager.AddRequestFromTables(2, std::nullopt, {{8, 10}});
  Fill(context, 2, {4, 6});
  ASSERT_OK(context.transceiver->RespondAndSendAsync(Task(2, 8, 0, std::nullopt)));
  GenerationRequest receive;
  receive.unique_rid = 2;
  receive.prompt_len = 8;
  receive.context_instance = "prefill";
  ASSERT_OK(generation.transceiver->RequestAndReceiveAsync(receive));
  std::vector<RequestStatus> done =
      generation.transceiver->CheckGenTransferStatus(1, In(absl::Seconds(30)));
  ASSERT_EQ(done.size(), 1u);
  EXPECT_EQ(done[0].state, SessionState::kFullyTransferred) << done[0].error;
  EXPECT_TRUE(SameSlots(generation, {8, 10}, context, {4, 6}));
}

void FenceThenTheNextRequestFlows(const TransceiverOptions::Staging& staging) {
  HeldRequest held;
  ASSERT_NO_FATAL_FAILURE(StartHeldRequest(staging, &held));
  // The connection is "lost": unsettled.
  held.faults->DropAllPeers();
  std::vector<RequestStatus> done =
      held.generation->transceiver->CheckGenTransferStatus(1, In(absl::Seconds(30)));
  ASSERT_EQ(done.size(), 1u);
  EXPECT_EQ(done[0].state, SessionState::kError) << done[0].error;
  EXPECT_EQ(held.generation->transceiver->metrics().fences, 1) << done[0].error;
  // Fresh grants under a new epoch: the next request moves every byte.
  held.faults->ClearFaults();
  ExpectTheNextRequestFlows(held);
  EXPECT_EQ(held.context->transceiver->metrics().staged_chunks > 0, staging.threshold_bytes > 0);
}

TEST(TransceiverFenceTest, UnsettledFailureIsFencedThenTheNextRequestFlows) {
  TransceiverOptions::Staging direct;
  direct.threshold_bytes = 0;  // Every write goes to the pools.
  FenceThenTheNextRequestFlows(direct);
}

// Found by `transceiver demo --soak` (issue 11): a staging slot whose write failed
// unsettled stayed busy for good (no credit comes for a chunk never announced), and
// the pair was reported settled, so the receiver never fenced the sender: once every
// slot had been lost so, each staged pair to that receiver waited for a slot until
// its deadline. Now the pair is reported unsettled (a late byte could still land in
// the receiver's slot), the receiver fences, and the fresh grants free the slot:
// nothing written under the old ones can land any more. One slot here, so one loss
// is enough to wedge it.
TEST(TransceiverFenceTest, AStagingSlotLostWithItsWriteComesBackAfterTheFence) {
  TransceiverOptions::Staging staging;
  staging.threshold_bytes = 1 << 20;  // Every pair stages.
  staging.slots = 1;
  FenceThenTheNextRequestFlows(staging);
}

// Found by `transceiver demo --soak` (issue 11): a generation rank that removes the
// context instance and adds it again makes a new staging arena; a chunk announced
// while the instance was gone is never credited, and the context rank kept that
// slot busy for good (one slot here: every later staged pair timed out). The new
// grants free it.
TEST(TransceiverStagingTest, AReAddedReceiverOwesNoCreditsForItsOldArena) {
  TransceiverOptions::Staging staging;
  staging.threshold_bytes = 1 << 20;  // Every pair stages.
  staging.slots = 1;
  HeldRequest held;
  ASSERT_NO_FATAL_FAILURE(StartHeldRequest(staging, &held));
  // The generation rank forgets the context instance while request 1's chunk is in
  // flight, so the chunk is announced to a rank that does not know the sender: no
  // credit comes for it.
  Transceiver& generation = *held.generation->transceiver;
  ASSERT_OK(generation.RemovePeerInstance("prefill"));
  EXPECT_EQ(generation.CheckGenTransferStatus(1, In(absl::Seconds(30))).size(), 1u);
  held.faults->ClearFaults();
  const absl::Time give_up = In(absl::Seconds(20));
  while (generation.metrics().bad_messages == 0 && absl::Now() < give_up) {
    held.context->transceiver->CheckContextTransferStatus(1, In(absl::Milliseconds(5)));
  }
  ASSERT_EQ(generation.metrics().bad_messages, 1);
  // Added again: a new arena, new grants; request 2 gets the slot.
  ASSERT_OK(generation.AddPeerInstance({held.context->transceiver->control_address()},
                                       In(absl::Seconds(10))));
  ExpectTheNextRequestFlows(held);
}

TEST_F(TransceiverTest, RemovedInstanceFailsItsRequestsAndCanComeBack) {
  const uint64_t rid = 24;
  generation_->manager.AddRequestFromTables(rid, std::nullopt, {{58, 59, 60, 61}});
  GenerationRequest receive;
  receive.unique_rid = rid;
  receive.prompt_len = 16;
  receive.context_instance = "prefill";
  ASSERT_OK(generation_->transceiver->RequestAndReceiveAsync(receive));
  ASSERT_OK(generation_->transceiver->RemovePeerInstance("prefill"));
  const RequestStatus got = OneGen();
  EXPECT_EQ(got.state, SessionState::kError);
  EXPECT_THAT(got.error, StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_THAT(generation_->transceiver->RemovePeerInstance("prefill"),
              StatusIs(absl::StatusCode::kNotFound));
  ASSERT_OK(generation_->transceiver->AddPeerInstance({context_->transceiver->control_address()},
                                                      In(absl::Seconds(10))));
  const uint64_t again = 25;
  context_->manager.AddRequestFromTables(again, std::nullopt, {{8, 9, 10, 11}});
  generation_->manager.AddRequestFromTables(again, std::nullopt, {{58, 59, 60, 61}});
  Fill(*context_, again, {8, 9, 10, 11});
  ASSERT_OK(context_->transceiver->RespondAndSendAsync(Task(again, 16)));
  receive.unique_rid = again;
  ASSERT_OK(generation_->transceiver->RequestAndReceiveAsync(receive));
  EXPECT_EQ(OneGen().state, SessionState::kFullyTransferred);
  EXPECT_TRUE(SameSlots(*generation_, {58, 59, 60, 61}, *context_, {8, 9, 10, 11}));
}

TEST_F(TransceiverTest, GarbageAndStrayMessagesAreCountedAndChangeNothing) {
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<transfer::ControlChannel> stranger,
                       transfer::ControlChannel::Create(transfer::ControlChannelOptions{}));
  const std::string target = generation_->transceiver->control_address();
  ASSERT_OK(stranger->Send(target, "not msgpack at all"));
  transfer::SliceResult forged;
  forged.unique_rid = 26;
  forged.outcome = transfer::SliceOutcome::kSuccess;
  ASSERT_OK(stranger->Send(target, transfer::EncodeMessage(forged)));  // from no known rank
  const uint64_t rid = 26;
  context_->manager.AddRequestFromTables(rid, std::nullopt, {{12, 13, 14, 15}});
  generation_->manager.AddRequestFromTables(rid, std::nullopt, {{62, 63, 0, 1}});
  Fill(*context_, rid, {12, 13, 14, 15});
  GenerationRequest receive;
  receive.unique_rid = rid;
  receive.prompt_len = 16;
  receive.context_instance = "prefill";
  ASSERT_OK(generation_->transceiver->RequestAndReceiveAsync(receive));
  ASSERT_OK(stranger->Send(target, transfer::EncodeMessage(forged)));
  ASSERT_OK(context_->transceiver->RespondAndSendAsync(Task(rid, 16)));
  EXPECT_EQ(OneGen().state, SessionState::kFullyTransferred);
  EXPECT_TRUE(SameSlots(*generation_, {62, 63, 0, 1}, *context_, {12, 13, 14, 15}));
  // The stranger's messages race the request on another connection: wait for them.
  const absl::Time give_up = In(absl::Seconds(10));
  TransceiverMetrics m = generation_->transceiver->metrics();
  while ((m.bad_messages < 1 || m.dropped_messages < 2) && absl::Now() < give_up) {
    generation_->transceiver->CheckGenTransferStatus(1, In(absl::Milliseconds(10)));
    m = generation_->transceiver->metrics();
  }
  EXPECT_GE(m.bad_messages, 1);
  EXPECT_GE(m.dropped_messages, 2);
}

// Staging mode: scattered blocks (one small write each) are gathered into slots
// smaller than three blocks, so chunks split blocks and slots cycle on credits.
TEST(TransceiverStagingTest, SmallWritesGoThroughStagingSlotsByteExact) {
  TransceiverOptions::Staging staging;
  staging.threshold_bytes = 1 << 20;  // Every pair stages.
  staging.slots = 2;
  staging.slot_bytes = 600;           // Not a multiple of a 128-byte block.
  std::unique_ptr<Rank> context =
      MakeRank("prefill", Role::kContext, transfer::MakeTopology(1, {2}), nullptr, &staging);
  std::unique_ptr<Rank> generation =
      MakeRank("decode", Role::kGeneration, transfer::MakeTopology(1, {2}), nullptr, &staging);
  ASSERT_OK(generation->transceiver->AddPeerInstance({context->transceiver->control_address()},
                                                     In(absl::Seconds(10))));
  const std::vector<int64_t> src = {0, 2, 4, 6, 8, 10, 12, 14};
  const std::vector<int64_t> dst = {31, 29, 27, 25, 23, 21, 19, 17};
  for (uint64_t rid : {1, 2, 3}) {
    SCOPED_TRACE(rid);
    context->manager.AddRequestFromTables(rid, std::nullopt, {src});
    generation->manager.AddRequestFromTables(rid, std::nullopt, {dst});
    Fill(*context, rid, src);
    ASSERT_OK(context->transceiver->RespondAndSendAsync(Task(rid, 32)));
    GenerationRequest receive;
    receive.unique_rid = rid;
    receive.prompt_len = 32;
    receive.context_instance = "prefill";
    ASSERT_OK(generation->transceiver->RequestAndReceiveAsync(receive));
    std::vector<RequestStatus> done =
        generation->transceiver->CheckGenTransferStatus(1, In(absl::Seconds(30)));
    ASSERT_EQ(done.size(), 1u);
    EXPECT_EQ(done[0].state, SessionState::kFullyTransferred) << done[0].error;
    EXPECT_TRUE(SameSlots(*generation, dst, *context, src));
    EXPECT_TRUE(Untouched(*generation, 30));
  }
  // 8 blocks in 600-byte slots, blocks split across chunks where they straddle.
  const int64_t chunks = transfer::CeilDiv(8 * static_cast<int64_t>(context->slot_bytes()), 600);
  ASSERT_GT(chunks, 1);
  EXPECT_EQ(context->transceiver->metrics().staged_chunks, 3 * chunks);
  EXPECT_EQ(generation->transceiver->metrics().staged_chunks, 3 * chunks);
}

// Staging only: a rank whose pools are never exposed to RDMA (the path CUDA pools
// take without FI_HMEM, here on host memory). Every pair is staged whatever its
// write size, from either side's choice.
TEST(TransceiverStagingTest, StagingOnlyRanksNeverExposeTheirPools) {
  for (bool on_generation : {true, false}) {
    SCOPED_TRACE(on_generation ? "generation stages only" : "context stages only");
    TransceiverOptions::Staging only;
    only.only = true;
    only.slot_bytes = 4096;
    std::unique_ptr<Rank> context = MakeRank("prefill", Role::kContext, transfer::MakeTopology(1, {2}),
                                             nullptr, on_generation ? nullptr : &only);
    std::unique_ptr<Rank> generation =
        MakeRank("decode", Role::kGeneration, transfer::MakeTopology(1, {2}), nullptr,
                 on_generation ? &only : nullptr);
    ASSERT_OK(generation->transceiver->AddPeerInstance({context->transceiver->control_address()},
                                                       In(absl::Seconds(10))));
    // Contiguous blocks: one large write if it were not staged.
    context->manager.AddRequestFromTables(1, std::nullopt, {{0, 1, 2, 3}});
    generation->manager.AddRequestFromTables(1, std::nullopt, {{4, 5, 6, 7}});
    Fill(*context, 1, {0, 1, 2, 3});
    ASSERT_OK(context->transceiver->RespondAndSendAsync(Task(1, 16)));
    GenerationRequest receive;
    receive.unique_rid = 1;
    receive.prompt_len = 16;
    receive.context_instance = "prefill";
    ASSERT_OK(generation->transceiver->RequestAndReceiveAsync(receive));
    std::vector<RequestStatus> done =
        generation->transceiver->CheckGenTransferStatus(1, In(absl::Seconds(30)));
    ASSERT_EQ(done.size(), 1u);
    EXPECT_EQ(done[0].state, SessionState::kFullyTransferred) << done[0].error;
    EXPECT_TRUE(SameSlots(*generation, {4, 5, 6, 7}, *context, {0, 1, 2, 3}));
    EXPECT_GE(context->transceiver->metrics().staged_chunks, 1);
  }
}

TEST_F(TransceiverTest, SidesAreTyped) {
  std::unique_ptr<Rank> other = MakeRank("decode-2", Role::kGeneration, transfer::MakeTopology(1, {2}));
  ASSERT_NE(other, nullptr);
  EXPECT_THAT(other->transceiver->AddPeerInstance({generation_->transceiver->control_address()},
                                                  In(absl::Seconds(10))),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(context_->transceiver->RequestAndReceiveAsync(GenerationRequest{}),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(generation_->transceiver->RespondAndSendAsync(ContextRequest{}),
              StatusIs(absl::StatusCode::kFailedPrecondition));
}

// --- CURVE (transfer/CONTROL_PLANE.md) ---------------------------------------------

transfer::ControlSecurity Curve(const transfer::CurveKeyPair& keys,
                                std::map<std::string, std::string> peers) {
  transfer::ControlSecurity security;
  security.mode = transfer::ControlSecurity::Mode::kCurve;
  security.keys = keys;
  security.peers = std::move(peers);
  return security;
}

// "prefill" and "decode" allow each other; decode also allows "mallory", an
// instance it knows, which will claim to be "prefill".
class CurveTransceiverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    prefill_keys_ = transfer::GenerateCurveKeyPair().value();
    decode_keys_ = transfer::GenerateCurveKeyPair().value();
    mallory_keys_ = transfer::GenerateCurveKeyPair().value();
    context_ = MakeRank("prefill", Role::kContext, transfer::MakeTopology(1, {2}), nullptr, nullptr,
                        Curve(prefill_keys_, {{"decode", decode_keys_.public_key}}));
    generation_ = MakeRank("decode", Role::kGeneration, transfer::MakeTopology(1, {2}), nullptr, nullptr,
                           Curve(decode_keys_, {{"prefill", prefill_keys_.public_key},
                                                {"mallory", mallory_keys_.public_key}}));
    ASSERT_NE(context_, nullptr);
    ASSERT_NE(generation_, nullptr);
  }

  // Decode asks prefill for 16 tokens into slots 10..13.
  absl::Status Receive(uint64_t rid) {
    generation_->manager.AddRequestFromTables(rid, std::nullopt, {{10, 11, 12, 13}});
    GenerationRequest receive;
    receive.unique_rid = rid;
    receive.prompt_len = 16;
    receive.context_instance = "prefill";
    return generation_->transceiver->RequestAndReceiveAsync(receive);
  }

  // Prefill sends them from slots 0..3; decode must then hold every byte.
  void ExpectSentAndReceived(uint64_t rid) {
    context_->manager.AddRequestFromTables(rid, std::nullopt, {{0, 1, 2, 3}});
    Fill(*context_, rid, {0, 1, 2, 3});
    ContextRequest send;
    send.unique_rid = rid;
    send.prompt_len = 16;
    ASSERT_OK(context_->transceiver->RespondAndSendAsync(send));
    std::vector<RequestStatus> done =
        generation_->transceiver->CheckGenTransferStatus(1, In(absl::Seconds(30)));
    ASSERT_EQ(done.size(), 1u);
    EXPECT_EQ(done[0].state, SessionState::kFullyTransferred) << done[0].error;
    EXPECT_TRUE(SameSlots(*generation_, {10, 11, 12, 13}, *context_, {0, 1, 2, 3}));
  }

  void ExpectOneRequestMoves(uint64_t rid) {
    ASSERT_OK(Receive(rid));
    ExpectSentAndReceived(rid);
  }

  transfer::CurveKeyPair prefill_keys_, decode_keys_, mallory_keys_;
  std::unique_ptr<Rank> context_;
  std::unique_ptr<Rank> generation_;
};

TEST_F(CurveTransceiverTest, AllowedInstancesHandshakeAndMoveKV) {
  const std::vector<std::string> prefill = {context_->transceiver->control_address()};
  // The handshake must be sealed for a named instance's key.
  EXPECT_THAT(generation_->transceiver->AddPeerInstance(prefill, In(absl::Seconds(10))),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(generation_->transceiver->AddPeerInstance("stranger", prefill,
                                                        In(absl::Seconds(10))),
              StatusIs(absl::StatusCode::kNotFound));
  ASSERT_OK(generation_->transceiver->AddPeerInstance("prefill", prefill, In(absl::Seconds(10))));
  ExpectOneRequestMoves(31);
  EXPECT_EQ(generation_->transceiver->metrics().bad_messages, 0);
}

TEST_F(CurveTransceiverTest, PeerClaimingAnotherInstanceLearnsNothing) {
  // Mallory holds a key decode allows, but calls itself "prefill".
  std::unique_ptr<Rank> mallory =
      MakeRank("prefill", Role::kContext, transfer::MakeTopology(1, {2}), nullptr, nullptr,
               Curve(mallory_keys_, {{"decode", decode_keys_.public_key}}));
  ASSERT_NE(mallory, nullptr);
  const std::vector<std::string> decode = {generation_->transceiver->control_address()};
  // Decode refuses its rank info without an answer: no page table, address or
  // grant comes back, so the handshake can only run out of time.
  EXPECT_THAT(mallory->transceiver->AddPeerInstance("decode", decode, In(absl::Seconds(2))),
              StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_EQ(mallory->transceiver->metrics().handshakes, 0);
  EXPECT_GE(generation_->transceiver->metrics().bad_messages, 1);
  // Nor did decode take it for the real prefill.
  EXPECT_THAT(Receive(32),
              StatusIs(absl::StatusCode::kFailedPrecondition, ::testing::HasSubstr("not added")));
  // The real one is still welcome.
  ASSERT_OK(generation_->transceiver->AddPeerInstance(
      "prefill", {context_->transceiver->control_address()}, In(absl::Seconds(10))));
  ExpectOneRequestMoves(33);
}

TEST_F(CurveTransceiverTest, InstanceOutsideTheAllowlistLearnsNothing) {
  const transfer::CurveKeyPair outsider_keys = transfer::GenerateCurveKeyPair().value();
  std::unique_ptr<Rank> outsider =
      MakeRank("prefill-9", Role::kContext, transfer::MakeTopology(1, {2}), nullptr, nullptr,
               Curve(outsider_keys, {{"decode", decode_keys_.public_key}}));
  ASSERT_NE(outsider, nullptr);
  EXPECT_THAT(outsider->transceiver->AddPeerInstance(
                  "decode", {generation_->transceiver->control_address()}, In(absl::Seconds(2))),
              StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_EQ(outsider->transceiver->metrics().handshakes, 0);
  ASSERT_OK(generation_->transceiver->AddPeerInstance(
      "prefill", {context_->transceiver->control_address()}, In(absl::Seconds(10))));
  ExpectOneRequestMoves(34);
}

TEST_F(CurveTransceiverTest, MessageFromAnotherInstancesAddressIsDropped) {
  ASSERT_OK(generation_->transceiver->AddPeerInstance(
      "prefill", {context_->transceiver->control_address()}, In(absl::Seconds(10))));
  const uint64_t rid = 36;
  ASSERT_OK(Receive(rid));
  // Mallory, with its own allowed key, sends a cancel from prefill's address.
  zmq::context_t context;
  zmq::socket_t forger(context, zmq::socket_type::dealer);
  forger.set(zmq::sockopt::linger, 0);
  forger.set(zmq::sockopt::routing_id, context_->transceiver->control_address());
  forger.set(zmq::sockopt::curve_serverkey, decode_keys_.public_key);
  forger.set(zmq::sockopt::curve_publickey, mallory_keys_.public_key);
  forger.set(zmq::sockopt::curve_secretkey, mallory_keys_.secret_key);
  forger.connect(generation_->transceiver->control_address());
  transfer::Cancel cancel;
  cancel.unique_rid = rid;
  cancel.sender_rank = 0;
  cancel.from = Role::kContext;
  cancel.reason = "forged";
  const std::string bytes = transfer::EncodeMessage(cancel);
  ASSERT_TRUE(forger.send(zmq::buffer(bytes), zmq::send_flags::none));
  // Accepted, the cancel would end the request at once; refused, it is counted.
  const absl::Time deadline = In(absl::Seconds(20));
  while (generation_->transceiver->metrics().bad_messages < 1 && absl::Now() < deadline) {
    ASSERT_THAT(generation_->transceiver->CheckGenTransferStatus(1, In(absl::Milliseconds(20))),
                ::testing::IsEmpty());
  }
  ASSERT_EQ(generation_->transceiver->metrics().bad_messages, 1);
  // The request goes on, from the real prefill.
  ExpectSentAndReceived(rid);
}

}  // namespace
}  // namespace kvx::transceiver
