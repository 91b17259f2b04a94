// The control plane under a peer that repeats itself, reorders, lies or guesses.
// A proxy sits between a generation rank and a context rank (each sees the proxy's
// address as the other's, the rank infos rewritten), so every message between them
// passes through it, re-encoded with transfer/protocol.h: duplicated, reversed,
// altered. Outsiders send raw bytes and forged messages to the ranks' real control
// addresses. Every byte is checked by the reference engine; a bad message must be
// counted, fail at most the request it names, and leave every other request clean.

#include <array>
#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>  // NOLINT(build/c++11)
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/status_matchers.h"
#include "tools/transceiver_harness.h"
#include "transfer/control_channel.h"
#include "transfer/protocol.h"
#include "transfer/session.h"
#include "transfer/transceiver/transceiver.h"
#include "transport/fault_injecting_transport.h"
#include "transport/transport.h"

namespace kvx::harness {
namespace {

using ::testing::HasSubstr;
using transfer::ControlChannel;
using transfer::Message;

// What the proxy forwards for one message: the bytes to send (none: dropped).
using Policy = std::function<std::vector<std::string>(bool to_context, const Message& message)>;

std::vector<std::string> Forward(bool, const Message& message) {
  return {transfer::EncodeMessage(message)};
}

class ControlProxy {
 public:
  // Forwards between the generation rank that adds it and the context rank at
  // `context_address`. With `reverse`, held messages go out in reverse order every
  // few milliseconds (each direction's batch), so later messages overtake earlier ones.
  static std::unique_ptr<ControlProxy> Start(std::string context_address, Policy policy,
                                             bool reverse) {
    auto proxy = std::unique_ptr<ControlProxy>(new ControlProxy());
    proxy->context_address_ = std::move(context_address);
    proxy->policy_ = std::move(policy);
    proxy->reverse_ = reverse;
    proxy->front_ = ControlChannel::Create({}).value();
    proxy->back_ = ControlChannel::Create({}).value();
    proxy->front_address_ = proxy->front_->address();
    proxy->thread_ = std::thread([raw = proxy.get()] { raw->Run(); });
    return proxy;
  }
  ~ControlProxy() {
    stop_.store(true);
    front_->Wake();
    back_->Wake();
    thread_.join();
  }
  // The address the generation side adds as the context rank's.
  const std::string& address() const { return front_address_; }
  int64_t forwarded() const { return forwarded_.load(); }

 private:
  ControlProxy() = default;

  void Run() {
    std::vector<ControlChannel::Incoming> in;
    std::vector<std::string> held[2];  // [to_context]
    absl::Time flush = absl::Now();
    while (!stop_.load()) {
      for (bool to_context : {true, false}) {
        in.clear();
        ControlChannel& from = to_context ? *front_ : *back_;
        if (!from.Poll(absl::Now() + absl::Milliseconds(1), &in).ok()) continue;
        for (ControlChannel::Incoming& message : in) {
          if (to_context) generation_address_ = message.from;
          absl::StatusOr<Message> decoded = transfer::DecodeMessage(message.bytes);
          if (!decoded.ok()) continue;
          const bool rank_info = Rewrite(to_context, &*decoded);
          for (std::string& bytes : rank_info ? std::vector<std::string>{transfer::EncodeMessage(*decoded)}
                                              : policy_(to_context, *decoded)) {
            if (reverse_ && !rank_info) {
              held[to_context].push_back(std::move(bytes));
            } else {
              Send(to_context, bytes);
            }
          }
        }
      }
      if (absl::Now() >= flush) {
        for (bool to_context : {true, false}) {
          for (auto it = held[to_context].rbegin(); it != held[to_context].rend(); ++it) {
            Send(to_context, *it);
          }
          held[to_context].clear();
        }
        flush = absl::Now() + absl::Milliseconds(5);
      }
    }
  }

  // Each side must see the proxy as the other: rank infos name its addresses.
  bool Rewrite(bool to_context, Message* message) {
    const std::string& self = to_context ? back_->address() : front_->address();
    if (auto* m = std::get_if<transfer::RankInfoRequest>(message)) {
      m->sender.control_address = self;
      return true;
    }
    if (auto* m = std::get_if<transfer::RankInfoReply>(message)) {
      m->sender.control_address = self;
      return true;
    }
    return false;
  }

  void Send(bool to_context, const std::string& bytes) {
    ControlChannel& via = to_context ? *back_ : *front_;
    const std::string& to = to_context ? context_address_ : generation_address_;
    if (to.empty() || !via.Send(to, bytes).ok()) return;
    forwarded_.fetch_add(1);
  }

  std::string context_address_;
  std::string generation_address_;  // learned from its first message
  std::string front_address_;
  Policy policy_;
  bool reverse_ = false;
  std::unique_ptr<ControlChannel> front_;  // faces the generation rank
  std::unique_ptr<ControlChannel> back_;   // faces the context rank
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> forwarded_{0};
  std::thread thread_;
};

RunOptions Options(bool with_cancel = true) {
  RunOptions options;
  options.model.num_layers = 4;
  options.model.num_kv_heads = 4;
  options.model.head_size = 8;
  options.model.tokens_per_block = 4;
  options.model.windows = {std::nullopt, 12};
  options.context.tp = 1;
  options.transport.kind = "loopback";
  options.concurrency = 8;
  options.request_timeout = absl::Seconds(20);
  options.run_timeout = absl::Seconds(60);
  const std::vector<Chunk> three = {{0, 10}, {10, 40}, {40, 64}};
  options.plans = {MakePlan(1, 37), MakePlan(2, 37, 6), MakePlan(3, 64, 0, three), MakePlan(4, 64, 17, three),
                   MakePlan(5, 100), MakePlan(6, 36, 36), MakePlan(7, 13, 4), MakePlan(8, 64, 0, three)};
  options.plans[4].keep_stale = true;
  options.plans[6].draft_block = true;
  // Cancelled by the generation side before it asks (so it always wins, and the
  // runs compare): its cancel may overtake its own request data.
  RequestPlan cancelled = MakePlan(9, 64, 0, three);
  cancelled.cancel = CancelWhen::kBefore;
  cancelled.cancel_side = Role::kGeneration;
  if (with_cancel) options.plans.push_back(cancelled);
  return options;
}

struct Pair {
  std::unique_ptr<Instance> context;
  std::unique_ptr<Instance> generation;
  std::unique_ptr<ControlProxy> proxy;
};

// Both instances; the generation side reaches the context through a proxy with
// `policy`, or directly without one.
Pair MakePair(const RunOptions& options, std::optional<Policy> policy, bool reverse = false) {
  Pair pair;
  pair.context =
      Instance::Create(SideOptions(options, Role::kContext).value(), options.plans).value();
  pair.generation =
      Instance::Create(SideOptions(options, Role::kGeneration).value(), options.plans).value();
  std::vector<std::string> addresses = pair.context->control_addresses();
  if (policy.has_value()) {
    pair.proxy = ControlProxy::Start(addresses[0], *std::move(policy), reverse);
    addresses = {pair.proxy->address()};
  }
  EXPECT_OK(pair.generation->AddPeer(addresses, absl::Now() + absl::Seconds(30)));
  return pair;
}

// Runs both instances; once every request is final, neither holds anything and no
// byte changed where no request was (Instance::CheckAtRest; `late_request_data`
// when the proxy repeats request data).
RunReport RunPair(Pair& pair, const RunOptions& options, bool late_request_data = false) {
  const absl::Time deadline = absl::Now() + options.run_timeout;
  pair.context->Start(deadline);
  pair.generation->Start(deadline);
  RunReport report;
  report.generation = pair.generation->Wait();
  report.context = pair.context->Wait();
  EXPECT_OK(pair.generation->CheckAtRest());
  EXPECT_OK(pair.context->CheckAtRest(late_request_data));
  return report;
}

std::string Table(const RunReport& report) {
  return FormatTable(report.context, report.generation, report.seconds);
}

// The same requests with an honest control plane: what must move, once.
RunReport Baseline(const RunOptions& options) {
  Pair pair = MakePair(options, std::nullopt);
  RunReport report = RunPair(pair, options);
  EXPECT_TRUE(report.ok()) << Table(report);
  return report;
}

// The same requests without a cancel (where a cancel lands changes what moved).
void ExpectSameTransfer(const RunReport& got, const RunReport& baseline) {
  EXPECT_EQ(got.generation.succeeded, baseline.generation.succeeded);
  EXPECT_EQ(got.generation.succeeded, got.generation.requests);
  EXPECT_EQ(got.generation.blocks_sent, baseline.generation.blocks_sent);
  // Exactly once: as many bytes and block pairs moved as without the disorder,
  // none planned, posted or counted twice.
  EXPECT_EQ(got.context.bytes, baseline.context.bytes);
  EXPECT_EQ(got.context.block_pairs, baseline.context.block_pairs);
  EXPECT_EQ(got.generation.bytes, baseline.generation.bytes);
}

// Runs `options` through a proxy with `policy` and checks it against `baseline`
// (the same requests, no cancel, an honest control plane); then once more with a
// request cancelled before it is asked for, which must end cancelled and leave
// the rest clean.
void ExpectHarmless(const Policy& policy, bool reverse, bool late_request_data) {
  const RunOptions options = Options(/*with_cancel=*/false);
  const RunReport baseline = Baseline(options);
  {
    Pair pair = MakePair(options, policy, reverse);
    const RunReport report = RunPair(pair, options, late_request_data);
    EXPECT_TRUE(report.ok()) << Table(report);
    ExpectSameTransfer(report, baseline);
    EXPECT_GT(pair.proxy->forwarded(), 0);
  }
  const RunOptions cancelling = Options(/*with_cancel=*/true);
  Pair pair = MakePair(cancelling, policy, reverse);
  const RunReport report = RunPair(pair, cancelling, late_request_data);
  EXPECT_TRUE(report.ok()) << Table(report);
  EXPECT_EQ(report.generation.cancelled, 1) << Table(report);
  EXPECT_EQ(report.generation.succeeded, baseline.generation.succeeded) << Table(report);
}

TEST(TransceiverControlTest, DuplicatedMessagesMoveEveryByteOnce) {
  ExpectHarmless(
      [](bool, const Message& message) {
        const std::string bytes = transfer::EncodeMessage(message);
        return std::vector<std::string>{bytes, bytes, bytes};
      },
      /*reverse=*/false, /*late_request_data=*/true);
}

TEST(TransceiverControlTest, ReorderedMessagesMoveEveryByte) {
  // Each batch goes out backwards: later slices' request data before earlier ones,
  // auxiliary tokens before results, a cancel before the data it cancels.
  ExpectHarmless(Forward, /*reverse=*/true, /*late_request_data=*/false);
}

// Staged chunks and credits come back long after they were first sent: each one
// brings along copies of the last eight before it. By then the slot they name
// holds a later chunk, so a stale chunk scattered, or a stale credit taken, would
// put another chunk's bytes into the pools.
TEST(TransceiverControlTest, StaleStagingMessagesChangeNothing) {
  const RunOptions options = Options(/*with_cancel=*/false);
  const RunReport baseline = Baseline(options);
  auto history = std::make_shared<std::array<std::deque<std::string>, 2>>();
  Pair pair = MakePair(options, [history](bool to_context, const Message& message) {
    std::vector<std::string> out = {transfer::EncodeMessage(message)};
    if (!std::holds_alternative<transfer::StagedChunk>(message) &&
        !std::holds_alternative<transfer::StagingCredit>(message)) {
      return out;
    }
    std::deque<std::string>& past = (*history)[to_context];
    out.insert(out.end(), past.begin(), past.end());
    past.push_back(out.front());
    if (past.size() > 8) past.pop_front();
    return out;
  });
  const RunReport report = RunPair(pair, options);
  EXPECT_TRUE(report.ok()) << Table(report);
  ExpectSameTransfer(report, baseline);
  // The copies came, and were dropped on both sides.
  EXPECT_GT(pair.context->rank(0).transceiver().metrics().staged_chunks, 0);
  EXPECT_GT(pair.context->rank(0).transceiver().metrics().dropped_messages, 0);
  EXPECT_GT(pair.generation->rank(0).transceiver().metrics().dropped_messages, 0);
}

// Request `rid` failed on both sides, saying `why`; every other request is clean.
void ExpectOnlyFailed(const RunReport& report, uint64_t rid, const std::string& why) {
  for (const SideReport* side : {&report.context, &report.generation}) {
    SCOPED_TRACE(side->role);
    EXPECT_EQ(side->failed, 1) << Table(report);
    ASSERT_EQ(side->failures.size(), 1u) << Table(report);
    EXPECT_THAT(side->failures[0], HasSubstr(absl::StrCat("request=", rid, " ")));
    EXPECT_THAT(side->failures[0], HasSubstr(why));
    EXPECT_EQ(side->succeeded + side->cancelled, side->requests - 1) << Table(report);
  }
  EXPECT_EQ(report.generation.mismatches, 0) << Table(report);
  EXPECT_EQ(report.generation.late_writes, 0) << Table(report);
}

// Request data for request 3 is followed by a copy that names other blocks: the
// context rank must fail request 3 alone (a conflicting duplicate), on both sides.
TEST(TransceiverControlTest, ConflictingRequestDataFailsOnlyItsRequest) {
  const RunOptions options = Options();
  Pair pair = MakePair(options, [](bool to_context, const Message& message) {
    std::vector<std::string> out = {transfer::EncodeMessage(message)};
    const auto* data = std::get_if<transfer::RequestData>(&message);
    if (to_context && data != nullptr && data->unique_rid == 3 && data->slice_id == 1) {
      transfer::RequestData lie = *data;
      for (transfer::BlockList& list : lie.block_ids_per_group) {
        for (int64_t& id : list) id ^= 1;
      }
      out.push_back(transfer::EncodeMessage(lie));
    }
    return out;
  });
  ExpectOnlyFailed(RunPair(pair, options, /*late_request_data=*/true), 3,
                   "conflicting request data");
}

// A generation rank that guesses: request 5's data names blocks far past the pools
// it declared. Nothing may be written; request 5 fails alone.
TEST(TransceiverControlTest, RequestDataNamingBlocksPastThePoolFailsOnlyItsRequest) {
  const RunOptions options = Options();
  Pair pair = MakePair(options, [](bool to_context, const Message& message) {
    const auto* data = std::get_if<transfer::RequestData>(&message);
    if (!to_context || data == nullptr || data->unique_rid != 5) {
      return std::vector<std::string>{transfer::EncodeMessage(message)};
    }
    transfer::RequestData lie = *data;
    for (transfer::BlockList& list : lie.block_ids_per_group) {
      for (int64_t& id : list) id += int64_t{1} << 40;
    }
    return std::vector<std::string>{transfer::EncodeMessage(lie)};
  });
  ExpectOnlyFailed(RunPair(pair, options), 5, "dst block id outside its pool");
}

// Messages cut short on the way: every message but the rank infos is followed by
// a copy cut to two thirds of its bytes (each counted bad where it lands), and
// request 5's request data arrives only cut. Request 5 ends TIMEOUT on both sides
// and alone: the context rank, asked to stop a request it never got request data
// for, answers that nothing of it is in flight, so the generation rank need not
// fence it, and the requests in flight with it (their completions held back past
// request 5's deadline and report grace) move every byte.
TEST(TransceiverControlTest, TruncatedMessagesFailOnlyTheirRequest) {
  RunOptions options = Options(/*with_cancel=*/false);
  options.plans[4].timeout = absl::Seconds(1);
  options.transport.wrap = [](std::unique_ptr<transport::Transport> inner, int64_t) {
    auto held = std::make_unique<transport::FaultInjectingTransport>(std::move(inner));
    held->DelayCompletions(absl::Seconds(4));
    return std::unique_ptr<transport::Transport>(std::move(held));
  };
  auto cut = std::make_shared<std::array<std::atomic<int64_t>, 2>>();
  Pair pair = MakePair(options, [cut](bool to_context, const Message& message) {
    const std::string bytes = transfer::EncodeMessage(message);
    std::vector<std::string> out = {bytes.substr(0, bytes.size() * 2 / 3)};
    (*cut)[to_context].fetch_add(1);
    const auto* data = std::get_if<transfer::RequestData>(&message);
    if (!to_context || data == nullptr || data->unique_rid != 5) out.insert(out.begin(), bytes);
    return out;
  });
  const RunReport report = RunPair(pair, options);
  // Each side by its own deadline, or the context side by the generation side's
  // word of it (CANCELLED), whichever comes first.
  ExpectOnlyFailed(report, 5, "by its deadline");
  EXPECT_EQ(report.generation.metrics.fences, 0) << Table(report);
  // Every cut copy reached its rank and was counted there (the last ones may land
  // after the run: counters cannot be awaited).
  const absl::Time patience = absl::Now() + absl::Seconds(10);
  auto bad = [](Instance& instance) { return instance.rank(0).transceiver().metrics().bad_messages; };
  while (absl::Now() < patience &&
         (bad(*pair.context) < (*cut)[1].load() || bad(*pair.generation) < (*cut)[0].load())) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_EQ(bad(*pair.context), (*cut)[1].load());
  EXPECT_EQ(bad(*pair.generation), (*cut)[0].load());
}

// Outsiders: raw bytes, a message cut short, an oversized one, and well-formed
// messages from a channel no rank shook hands with (results and auxiliary tokens
// that would finish a request early, a cancel). Counted as bad or dropped; the
// requests they name still move every byte.
TEST(TransceiverControlTest, GarbageAndForgedMessagesAreCountedAndChangeNothing) {
  RunOptions options = Options();
  options.concurrency = 64;
  Pair pair = MakePair(options, std::nullopt);
  const absl::Time deadline = absl::Now() + options.run_timeout;
  pair.generation->Start(deadline);  // asks for everything; the context waits
  std::unique_ptr<ControlChannel> outsider = ControlChannel::Create({}).value();
  const std::string context_address = pair.context->control_addresses()[0];
  const std::string generation_address = pair.generation->control_addresses()[0];
  transfer::SliceResult result;
  result.unique_rid = 1;
  result.outcome = transfer::SliceOutcome::kSuccess;
  result.is_last_slice = true;
  const std::string valid = transfer::EncodeMessage(result);
  const std::vector<std::string> garbage = {
      "", std::string(1, '\xc1'), "not msgpack at all", valid.substr(0, valid.size() / 2),
      std::string(100000, '\xff')};
  int64_t bad = 0;
  for (const std::string& to : {context_address, generation_address}) {
    for (const std::string& bytes : garbage) {
      ASSERT_OK(outsider->Send(to, bytes));
      ++bad;
    }
  }
  // Well-formed, from nobody: every plan's last slice "succeeded", its tokens, a cancel.
  for (const RequestPlan& plan : options.plans) {
    transfer::SliceResult forged = result;
    forged.unique_rid = plan.rid;
    forged.slice_id = static_cast<int64_t>(plan.chunks.size()) - 1;
    ASSERT_OK(outsider->Send(generation_address, transfer::EncodeMessage(forged)));
    transfer::AuxTokens aux;
    aux.unique_rid = plan.rid;
    aux.tokens = plan.aux_tokens();
    ASSERT_OK(outsider->Send(generation_address, transfer::EncodeMessage(aux)));
    transfer::Cancel cancel;
    cancel.unique_rid = plan.rid;
    cancel.from = Role::kGeneration;
    ASSERT_OK(outsider->Send(context_address, transfer::EncodeMessage(cancel)));
  }
  // Wait until the ranks have seen all of it, then let the context side run.
  const absl::Time seen_by = absl::Now() + absl::Seconds(30);
  auto metrics = [](Instance& instance) { return instance.rank(0).transceiver().metrics(); };
  while (absl::Now() < seen_by &&
         (metrics(*pair.context).bad_messages + metrics(*pair.generation).bad_messages < bad ||
          metrics(*pair.generation).dropped_messages < 2 * static_cast<int64_t>(options.plans.size()) ||
          metrics(*pair.context).dropped_messages < static_cast<int64_t>(options.plans.size()))) {
    absl::SleepFor(absl::Milliseconds(5));  // counters cannot be awaited
  }
  EXPECT_EQ(metrics(*pair.context).bad_messages + metrics(*pair.generation).bad_messages, bad);
  // No request finished on a forged result.
  for (const RequestPlan& plan : options.plans) {
    absl::StatusOr<transceiver::RequestStatus> status =
        pair.generation->rank(0).transceiver().GetStatus(plan.rid);
    if (status.ok()) EXPECT_FALSE(status->final()) << "request=" << plan.rid;
  }
  pair.context->Start(deadline);
  RunReport report;
  report.generation = pair.generation->Wait();
  report.context = pair.context->Wait();
  EXPECT_TRUE(report.ok()) << Table(report);
  EXPECT_EQ(report.generation.failed + report.context.failed, 0) << Table(report);
}

}  // namespace
}  // namespace kvx::harness
