#include "transfer/session.h"

#include <cstdint>
#include <map>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/status_matchers.h"
#include "transfer/protocol.h"
#include "transfer/slice.h"

namespace kvx::transfer {
namespace {

using ::kvx::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::IsEmpty;

const absl::Time kT0 = absl::FromUnixSeconds(1000);
const absl::Time kFar = kT0 + absl::Hours(1);

KVSlice Slice(int64_t start, int64_t end, bool last, BlockList blocks) {
  KVSlice slice;
  slice.token_range = TokenRange::Create(start, end).value();
  slice.block_ids_per_layer_group = {std::move(blocks)};
  slice.is_last_slice = last;
  return slice;
}

RequestData Data(int64_t slice_id, int64_t receiver, bool last, BlockList blocks = {20, 21}) {
  RequestData data;
  data.unique_rid = 7;
  data.slice_id = slice_id;
  data.receiver_rank = receiver;
  data.prompt_len = 32;
  data.token_start = 16 * slice_id;
  data.token_end = 16 * (slice_id + 1);
  data.is_last_slice = last;
  data.block_ids_per_group = {std::move(blocks)};
  data.aux_slot = 3;
  return data;
}

// The actions of one kind, in order.
template <typename T>
std::vector<T> Only(const std::vector<SessionAction>& actions) {
  std::vector<T> out;
  for (const SessionAction& a : actions) {
    if (const T* t = std::get_if<T>(&a)) out.push_back(*t);
  }
  return out;
}

template <typename M>
std::vector<std::pair<int64_t, M>> Sent(const std::vector<SessionAction>& actions) {
  std::vector<std::pair<int64_t, M>> out;
  for (const SendMessage& s : Only<SendMessage>(actions)) {
    if (const M* m = std::get_if<M>(&s.message)) out.emplace_back(s.peer_rank, *m);
  }
  return out;
}

SliceOutcomeInfo Delivered() { return SliceOutcomeInfo{absl::OkStatus(), true, 100, 1}; }

// --- Sender --------------------------------------------------------------------------

TEST(SenderSessionTest, DispatchesOncePerPairWhicheverArrivesFirst) {
  for (bool slice_first : {true, false}) {
    SCOPED_TRACE(slice_first ? "slice first" : "request data first");
    SenderSession s(7, /*self_rank=*/0);
    s.ExpectReceivers({0});
    std::vector<SessionAction> actions;
    if (slice_first) {
      ASSERT_OK(s.AddSlice(0, Slice(0, 32, true, {10, 11}), {5}, kFar, &actions));
      EXPECT_THAT(Only<PostSlice>(actions), IsEmpty());
      s.OnRequestData(Data(0, 0, true), &actions);
    } else {
      s.OnRequestData(Data(0, 0, true), &actions);
      EXPECT_THAT(Only<PostSlice>(actions), IsEmpty());
      EXPECT_EQ(s.state(), SessionState::kReady);
      ASSERT_OK(s.AddSlice(0, Slice(0, 32, true, {10, 11}), {5}, kFar, &actions));
    }
    ASSERT_EQ(Only<PostSlice>(actions).size(), 1u);
    // The same request data again (a duplicated message) dispatches nothing.
    s.OnRequestData(Data(0, 0, true), &actions);
    EXPECT_EQ(Only<PostSlice>(actions).size(), 1u);
    EXPECT_EQ(s.state(), SessionState::kTransferring);
    s.OnSliceEnded(0, 0, Delivered(), &actions);
    const auto results = Sent<SliceResult>(actions);
    ASSERT_EQ(results.size(), 1u);
    EXPECT_EQ(results[0].second.outcome, SliceOutcome::kSuccess);
    EXPECT_TRUE(results[0].second.is_last_slice);
    const auto aux = Sent<AuxTokens>(actions);
    ASSERT_EQ(aux.size(), 1u);
    EXPECT_THAT(aux[0].second.tokens, ElementsAre(5));
    EXPECT_EQ(aux[0].second.aux_slot, 3);
    EXPECT_EQ(s.state(), SessionState::kFullyTransferred);
    EXPECT_EQ(s.bytes(), 100u);
  }
}

TEST(SenderSessionTest, ConflictingRequestDataFailsTheRequest) {
  SenderSession s(7, 0);
  s.ExpectReceivers({0});
  std::vector<SessionAction> actions;
  s.OnRequestData(Data(0, 0, true, {20, 21}), &actions);
  s.OnRequestData(Data(0, 0, true, {20, 99}), &actions);
  EXPECT_THAT(s.error(), StatusIs(absl::StatusCode::kInvalidArgument));
  // The pair was never posted: it still gets exactly one FAILED, settled.
  const auto results = Sent<SliceResult>(actions);
  ASSERT_EQ(results.size(), 1u);
  EXPECT_EQ(results[0].second.outcome, SliceOutcome::kFailed);
  EXPECT_TRUE(results[0].second.settled);
  EXPECT_EQ(s.state(), SessionState::kError);
  ASSERT_OK(s.AddSlice(0, Slice(0, 32, true, {10, 11}), {}, kFar, &actions));
  EXPECT_THAT(Only<PostSlice>(actions), IsEmpty());
}

TEST(SenderSessionTest, RequestDataFromARankThatDoesNotOverlapIsAnsweredAndIgnored) {
  SenderSession s(7, 0);
  s.ExpectReceivers({0});
  std::vector<SessionAction> actions;
  s.OnRequestData(Data(0, 5, true), &actions);
  const auto results = Sent<SliceResult>(actions);
  ASSERT_EQ(results.size(), 1u);
  EXPECT_EQ(results[0].first, 5);
  EXPECT_EQ(results[0].second.outcome, SliceOutcome::kFailed);
  EXPECT_OK(s.error());
  EXPECT_EQ(s.state(), SessionState::kInit);
}

TEST(SenderSessionTest, MultiSliceCompletesWhenEveryPairOfEverySliceIsDelivered) {
  SenderSession s(7, 0);
  s.ExpectReceivers({0, 1});
  std::vector<SessionAction> actions;
  for (int64_t r : {0, 1}) {
    s.OnRequestData(Data(0, r, false), &actions);
    s.OnRequestData(Data(1, r, true, {22, 23}), &actions);
  }
  ASSERT_OK(s.AddSlice(0, Slice(0, 16, false, {10, 11}), {}, kFar, &actions));
  ASSERT_EQ(Only<PostSlice>(actions).size(), 2u);
  s.OnSliceEnded(0, 0, Delivered(), &actions);
  s.OnSliceEnded(0, 1, Delivered(), &actions);
  EXPECT_EQ(s.state(), SessionState::kTransferring);  // Slice 1 not given yet.
  ASSERT_OK(s.AddSlice(1, Slice(0, 32, true, {12, 13}), {9, 8}, kFar, &actions));
  ASSERT_EQ(Only<PostSlice>(actions).size(), 4u);
  s.OnSliceEnded(1, 1, Delivered(), &actions);
  EXPECT_THAT(Sent<AuxTokens>(actions), IsEmpty());
  s.OnSliceEnded(1, 0, Delivered(), &actions);
  EXPECT_EQ(Sent<AuxTokens>(actions).size(), 2u);
  EXPECT_EQ(s.state(), SessionState::kFullyTransferred);
  EXPECT_EQ(Sent<SliceResult>(actions).size(), 4u);
}

TEST(SenderSessionTest, OneFailedPairCancelsTheRestAndIsFinalOnlyOnceAllQuiesced) {
  SenderSession s(7, 0);
  s.ExpectReceivers({0, 1, 2});
  std::vector<SessionAction> actions;
  s.OnRequestData(Data(0, 0, true), &actions);
  s.OnRequestData(Data(0, 1, true), &actions);
  ASSERT_OK(s.AddSlice(0, Slice(0, 32, true, {10, 11}), {}, kFar, &actions));
  ASSERT_EQ(Only<PostSlice>(actions).size(), 2u);
  s.OnSliceEnded(0, 0, SliceOutcomeInfo{absl::UnavailableError("write refused"), false, 0, 0},
                 &actions);
  EXPECT_EQ(Only<CancelPosted>(actions).size(), 1u);
  EXPECT_THAT(s.error(), StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_FALSE(IsFinal(s.state())) << "receiver 1's transfer is still in flight";
  s.OnSliceEnded(0, 1, SliceOutcomeInfo{absl::AbortedError("cancelled"), true, 0, 0}, &actions);
  EXPECT_EQ(s.state(), SessionState::kError);
  // Receiver 2's request data arrives late: it still gets its one answer.
  s.OnRequestData(Data(0, 2, true), &actions);
  const auto results = Sent<SliceResult>(actions);
  ASSERT_EQ(results.size(), 3u);
  EXPECT_FALSE(results[0].second.settled);
  EXPECT_TRUE(results[1].second.settled);
  EXPECT_EQ(results[2].first, 2);
  EXPECT_TRUE(results[2].second.settled);
  EXPECT_THAT(Only<PostSlice>(actions).size(), 2u);
}

TEST(SenderSessionTest, CancelBeforeTheTaskPostsNothing) {
  SenderSession s(7, 0);
  s.ExpectReceivers({0});
  std::vector<SessionAction> actions;
  s.OnRequestData(Data(0, 0, true), &actions);
  s.Cancel("engine gave up", &actions);
  EXPECT_EQ(s.state(), SessionState::kCancelled);
  ASSERT_OK(s.AddSlice(0, Slice(0, 32, true, {10, 11}), {}, kFar, &actions));
  EXPECT_THAT(Only<PostSlice>(actions), IsEmpty());
  const auto results = Sent<SliceResult>(actions);
  ASSERT_EQ(results.size(), 1u);
  EXPECT_EQ(results[0].second.code, static_cast<int32_t>(absl::StatusCode::kAborted));
}

// Found by //tools:transceiver_e2e_test (issue 9): a receiver whose pairs were all
// delivered (SUCCESS sent) waits for the auxiliary tokens, which go out only once
// every receiver is done. When the request then failed or was cancelled, that
// receiver heard nothing more and hung until its own deadline.
TEST(SenderSessionTest, AReceiverThatGotEverythingIsToldWhenTheRequestFailsBeforeItsAux) {
  for (const bool delivered_before_cancel : {true, false}) {
    SCOPED_TRACE(delivered_before_cancel ? "delivered, then cancel" : "cancel while in flight");
    SenderSession s(7, 0);
    s.ExpectReceivers({0, 1});
    std::vector<SessionAction> actions;
    ASSERT_OK(s.AddSlice(0, Slice(0, 32, true, {10, 11}), {5}, kFar, &actions));
    s.OnRequestData(Data(0, 0, true), &actions);
    ASSERT_EQ(Only<PostSlice>(actions).size(), 1u);
    if (delivered_before_cancel) s.OnSliceEnded(0, 0, Delivered(), &actions);
    s.Cancel("engine gave up", &actions);
    // Delivered anyway (a write in flight is never interrupted): SUCCESS stands.
    if (!delivered_before_cancel) s.OnSliceEnded(0, 0, Delivered(), &actions);
    EXPECT_EQ(s.state(), SessionState::kCancelled);
    EXPECT_THAT(Sent<AuxTokens>(actions), IsEmpty());
    const auto results = Sent<SliceResult>(actions);
    ASSERT_EQ(results.size(), 1u);
    EXPECT_EQ(results[0].second.outcome, SliceOutcome::kSuccess);
    // Receiver 0 must not wait for tokens that will never come.
    const auto cancels = Sent<Cancel>(actions);
    ASSERT_EQ(cancels.size(), 1u);
    EXPECT_EQ(cancels[0].first, 0);
    EXPECT_EQ(cancels[0].second.from, Role::kContext);
    EXPECT_EQ(cancels[0].second.unique_rid, 7u);
  }
}

// Found by //tools:transceiver_control_test (issue 11): a receiver whose request
// data was lost gives up and cancels; the sender, holding no request data from it,
// answered nothing, so after the report grace the receiver fenced the sender and
// every other request in flight with it failed. It now answers with a Cancel of
// its own once nothing is in flight to that receiver (invariant 5).
TEST(SenderSessionTest, AReceiversCancelIsAnsweredOnceNothingIsInFlightToIt) {
  {
    SCOPED_TRACE("its request data never came");
    SenderSession s(7, 0);
    std::vector<SessionAction> actions;
    ASSERT_OK(s.AddSlice(0, Slice(0, 32, true, {10, 11}), {}, kFar, &actions));
    s.OnReceiverCancel(1, "receiver timed out", &actions);
    EXPECT_EQ(s.state(), SessionState::kCancelled);
    EXPECT_THAT(Sent<SliceResult>(actions), IsEmpty());
    const auto cancels = Sent<Cancel>(actions);
    ASSERT_EQ(cancels.size(), 1u);
    EXPECT_EQ(cancels[0].first, 1);
    EXPECT_EQ(cancels[0].second.from, Role::kContext);
    EXPECT_EQ(cancels[0].second.sender_rank, 0);
  }
  for (const bool settled : {true, false}) {
    SCOPED_TRACE(settled ? "a write in flight, then settled" : "a write in flight, unsettled");
    SenderSession s(7, 0);
    s.ExpectReceivers({0});
    std::vector<SessionAction> actions;
    ASSERT_OK(s.AddSlice(0, Slice(0, 32, true, {10, 11}), {}, kFar, &actions));
    s.OnRequestData(Data(0, 0, true), &actions);
    ASSERT_EQ(Only<PostSlice>(actions).size(), 1u);
    s.OnReceiverCancel(0, "receiver timed out", &actions);
    EXPECT_EQ(Only<CancelPosted>(actions).size(), 1u);
    EXPECT_THAT(Sent<Cancel>(actions), IsEmpty()) << "a write may still land";
    s.OnSliceEnded(0, 0, SliceOutcomeInfo{absl::AbortedError("cancelled"), settled, 0, 0},
                   &actions);
    ASSERT_EQ(Sent<SliceResult>(actions).size(), 1u);
    // Unsettled: the receiver must fence this rank, so no word that it is done.
    EXPECT_EQ(Sent<Cancel>(actions).size(), settled ? 1u : 0u);
    EXPECT_EQ(s.state(), SessionState::kCancelled);
  }
}

TEST(SenderSessionTest, DeadlineWithoutRequestDataFailsSettled) {
  SenderSession s(7, 0);
  std::vector<SessionAction> actions;
  ASSERT_OK(s.AddSlice(0, Slice(0, 32, true, {10, 11}), {}, kT0 + absl::Seconds(1), &actions));
  s.OnDeadline(kT0, &actions);
  EXPECT_FALSE(IsFinal(s.state()));
  s.OnDeadline(kT0 + absl::Seconds(1), &actions);
  EXPECT_EQ(s.state(), SessionState::kError);
  EXPECT_THAT(s.error(), StatusIs(absl::StatusCode::kDeadlineExceeded));
}

TEST(SenderSessionTest, SlicesMustAgreeWithTheReceiverOnTheLastOne) {
  SenderSession s(7, 0);
  s.ExpectReceivers({0});
  std::vector<SessionAction> actions;
  s.OnRequestData(Data(0, 0, /*last=*/false), &actions);
  EXPECT_THAT(s.AddSlice(0, Slice(0, 32, true, {10, 11}), {}, kFar, &actions),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(s.state(), SessionState::kError);
  SenderSession twice(8, 0);
  ASSERT_OK(twice.AddSlice(0, Slice(0, 16, false, {10}), {}, kFar, &actions));
  EXPECT_THAT(twice.AddSlice(0, Slice(0, 16, false, {10}), {}, kFar, &actions),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

// Regression (issue 11, session_fuzzer): request data for a slice past the last
// one, arriving before the engine said which slice is last, was kept and never
// answered while the rest of the request completed: the receiver waited for its
// result until its deadline, then fenced the sender.
TEST(SenderSessionTest, RequestDataPastTheLastSliceGivenLaterFailsTheRequest) {
  SenderSession s(7, 0);
  s.ExpectReceivers({0});
  std::vector<SessionAction> actions;
  s.OnRequestData(Data(1, 0, /*last=*/false), &actions);
  EXPECT_THAT(s.AddSlice(0, Slice(0, 16, /*last=*/true, {10}), {}, kFar, &actions),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(s.state(), SessionState::kError);
  const auto results = Sent<SliceResult>(actions);
  ASSERT_EQ(results.size(), 1u);
  EXPECT_EQ(results[0].second.slice_id, 1);
  EXPECT_EQ(results[0].second.outcome, SliceOutcome::kFailed);
  EXPECT_TRUE(results[0].second.settled);
}

// Regression (issue 11, session_fuzzer): request data for a slice past the last
// one, arriving once the request had failed or completed, got no result at all.
TEST(SenderSessionTest, RequestDataPastTheLastSliceIsAnsweredWhenTheRequestEnded) {
  {
    SenderSession s(7, 0);
    s.ExpectReceivers({0});
    std::vector<SessionAction> actions;
    ASSERT_OK(s.AddSlice(0, Slice(0, 16, /*last=*/true, {10}), {}, kFar, &actions));
    EXPECT_THAT(s.AddSlice(1, Slice(16, 32, false, {11}), {}, kFar, &actions),
                StatusIs(absl::StatusCode::kInvalidArgument));
    ASSERT_EQ(s.state(), SessionState::kError);
    s.OnRequestData(Data(1, 0, /*last=*/false), &actions);
    const auto results = Sent<SliceResult>(actions);
    ASSERT_EQ(results.size(), 1u);
    EXPECT_EQ(results[0].second.slice_id, 1);
    EXPECT_EQ(results[0].second.code, static_cast<int32_t>(absl::StatusCode::kInvalidArgument));
    EXPECT_TRUE(results[0].second.settled);
  }
  {
    SenderSession s(7, 0);
    s.ExpectReceivers({0});
    std::vector<SessionAction> actions;
    ASSERT_OK(s.AddSlice(0, Slice(0, 16, /*last=*/true, {10}), {}, kFar, &actions));
    s.OnRequestData(Data(0, 0, /*last=*/true), &actions);
    s.OnSliceEnded(0, 0, Delivered(), &actions);
    ASSERT_EQ(s.state(), SessionState::kFullyTransferred);
    actions.clear();
    s.OnRequestData(Data(1, 0, /*last=*/false), &actions);
    const auto results = Sent<SliceResult>(actions);
    ASSERT_EQ(results.size(), 1u);
    EXPECT_EQ(results[0].second.slice_id, 1);
    EXPECT_EQ(results[0].second.outcome, SliceOutcome::kFailed);
    EXPECT_EQ(s.state(), SessionState::kFullyTransferred);  // The request itself is done.
    EXPECT_OK(s.error());
  }
}

// --- Receiver ------------------------------------------------------------------------

ReceiverRequest TwoSliceRequest() {
  ReceiverRequest r;
  r.unique_rid = 7;
  r.self_rank = 0;
  r.prompt_len = 32;
  r.aux_slot = 3;
  r.slices = {{0, Slice(0, 16, false, {20, 21})}, {1, Slice(0, 32, true, {22, 23})}};
  r.deadline = kT0 + absl::Seconds(10);
  r.report_grace = absl::Seconds(2);
  return r;
}

SliceResult Result(int64_t slice, int64_t sender, SliceOutcome outcome, bool settled = true) {
  SliceResult r;
  r.unique_rid = 7;
  r.slice_id = slice;
  r.sender_rank = sender;
  r.outcome = outcome;
  r.is_last_slice = slice == 1;
  r.settled = settled;
  r.code = outcome == SliceOutcome::kSuccess ? 0 : static_cast<int32_t>(absl::StatusCode::kUnavailable);
  return r;
}

AuxTokens Aux(int64_t sender, std::vector<int64_t> tokens) {
  AuxTokens a;
  a.unique_rid = 7;
  a.sender_rank = sender;
  a.tokens = std::move(tokens);
  return a;
}

TEST(ReceiverSessionTest, SendsRequestDataPerSliceAndSenderAndCompletesWithAux) {
  ReceiverSession r(TwoSliceRequest());
  std::vector<SessionAction> actions;
  r.Start({{0, 4}, {1, 9}}, &actions);
  const auto data = Sent<RequestData>(actions);
  ASSERT_EQ(data.size(), 4u);
  EXPECT_EQ(data[0].second.grant_epoch, 4u);
  EXPECT_EQ(data[2].second.grant_epoch, 9u);
  EXPECT_EQ(data[1].second.token_end, 32);
  EXPECT_TRUE(data[1].second.is_last_slice);
  EXPECT_EQ(r.state(), SessionState::kReady);
  for (int64_t sender : {0, 1}) {
    for (int64_t slice : {0, 1}) r.OnResult(Result(slice, sender, SliceOutcome::kSuccess), kT0, &actions);
  }
  // A duplicated result counts once.
  r.OnResult(Result(1, 1, SliceOutcome::kFailed), kT0, &actions);
  EXPECT_EQ(r.state(), SessionState::kKvTransferred);
  r.OnAuxTokens(Aux(1, {42}), kT0, &actions);
  EXPECT_EQ(r.state(), SessionState::kFullyTransferred);
  EXPECT_THAT(r.aux_tokens(), ElementsAre(42));
}

TEST(ReceiverSessionTest, SettledFailureCancelsTheOthersAndEndsOnceTheyReport) {
  ReceiverSession r(TwoSliceRequest());
  std::vector<SessionAction> actions;
  r.Start({{0, 1}, {1, 1}}, &actions);
  r.OnResult(Result(0, 0, SliceOutcome::kFailed), kT0, &actions);
  // Both senders owe results, so both are told to stop.
  EXPECT_EQ(Sent<transfer::Cancel>(actions).size(), 2u);
  EXPECT_THAT(Only<FenceSender>(actions), IsEmpty());
  r.OnResult(Result(1, 0, SliceOutcome::kFailed), kT0, &actions);
  r.OnResult(Result(0, 1, SliceOutcome::kSuccess), kT0, &actions);
  EXPECT_FALSE(IsFinal(r.state()));
  r.OnResult(Result(1, 1, SliceOutcome::kFailed), kT0, &actions);
  EXPECT_EQ(r.state(), SessionState::kError);
  EXPECT_THAT(r.error(), StatusIs(absl::StatusCode::kUnavailable));
}

TEST(ReceiverSessionTest, UnsettledFailureFencesTheSenderBeforeItEnds) {
  ReceiverSession r(TwoSliceRequest());
  std::vector<SessionAction> actions;
  r.Start({{0, 1}}, &actions);
  r.OnResult(Result(0, 0, SliceOutcome::kFailed, /*settled=*/false), kT0, &actions);
  ASSERT_EQ(Only<FenceSender>(actions).size(), 1u);
  r.OnResult(Result(1, 0, SliceOutcome::kFailed, /*settled=*/true), kT0, &actions);
  EXPECT_FALSE(IsFinal(r.state())) << "slice 0 may still land until the fence";
  r.OnSenderFenced(0, kT0, &actions);
  EXPECT_EQ(r.state(), SessionState::kError);
}

TEST(ReceiverSessionTest, DeadlineCancelsThenFencesSendersThatDoNotAnswer) {
  ReceiverSession r(TwoSliceRequest());
  std::vector<SessionAction> actions;
  r.Start({{0, 1}, {1, 1}}, &actions);
  r.OnResult(Result(0, 0, SliceOutcome::kSuccess), kT0, &actions);
  r.OnResult(Result(1, 0, SliceOutcome::kSuccess), kT0, &actions);
  const absl::Time deadline = kT0 + absl::Seconds(10);
  EXPECT_EQ(r.next_deadline(), deadline);
  r.OnDeadline(deadline, &actions);
  EXPECT_THAT(r.error(), StatusIs(absl::StatusCode::kDeadlineExceeded));
  const auto cancels = Sent<transfer::Cancel>(actions);
  ASSERT_EQ(cancels.size(), 1u);  // Sender 0 already delivered everything.
  EXPECT_EQ(cancels[0].first, 1);
  EXPECT_EQ(r.next_deadline(), deadline + absl::Seconds(2));
  r.OnDeadline(deadline + absl::Seconds(2), &actions);
  const auto fences = Only<FenceSender>(actions);
  ASSERT_EQ(fences.size(), 1u);
  EXPECT_EQ(fences[0].sender_rank, 1);
  EXPECT_TRUE(r.waits_on(1));
  r.OnSenderFenced(1, deadline + absl::Seconds(2), &actions);
  EXPECT_EQ(r.state(), SessionState::kError);
}

TEST(ReceiverSessionTest, CancelEndsCancelledOnceSendersReport) {
  ReceiverSession r(TwoSliceRequest());
  std::vector<SessionAction> actions;
  r.Start({{0, 1}}, &actions);
  r.Cancel("client went away", kT0, &actions);
  EXPECT_EQ(Sent<transfer::Cancel>(actions).size(), 1u);
  r.OnResult(Result(0, 0, SliceOutcome::kFailed), kT0, &actions);
  r.OnResult(Result(1, 0, SliceOutcome::kFailed), kT0, &actions);
  EXPECT_EQ(r.state(), SessionState::kCancelled);
}

// A sender's Cancel: nothing more comes from it, so the receiver ends without the
// report grace or a fence, keeping what it reported; an unsettled result still
// needs the fence.
TEST(ReceiverSessionTest, ASendersCancelReleasesItUnlessAWriteMayStillLand) {
  {
    ReceiverSession r(TwoSliceRequest());
    std::vector<SessionAction> actions;
    r.Start({{0, 1}, {1, 1}}, &actions);
    r.OnResult(Result(0, 1, SliceOutcome::kSuccess), kT0, &actions);
    r.OnDeadline(kT0 + absl::Seconds(10), &actions);  // sender 0 never answered
    actions.clear();
    r.OnSenderCancel(0, "nothing in flight", kT0 + absl::Seconds(10), &actions);
    EXPECT_FALSE(IsFinal(r.state())) << "sender 1 still owes slice 1";
    r.OnSenderCancel(1, "nothing in flight", kT0 + absl::Seconds(10), &actions);
    EXPECT_EQ(r.state(), SessionState::kError);
    EXPECT_THAT(r.error(), StatusIs(absl::StatusCode::kDeadlineExceeded));
    EXPECT_THAT(Only<FenceSender>(actions), IsEmpty());
    EXPECT_THAT(Sent<transfer::Cancel>(actions), IsEmpty());
  }
  {
    ReceiverSession r(TwoSliceRequest());
    std::vector<SessionAction> actions;
    r.Start({{0, 1}}, &actions);
    r.OnResult(Result(0, 0, SliceOutcome::kFailed, /*settled=*/false), kT0, &actions);
    r.OnSenderCancel(0, "nothing in flight", kT0, &actions);
    EXPECT_FALSE(IsFinal(r.state())) << "slice 0 may still land until the fence";
    ASSERT_EQ(Only<FenceSender>(actions).size(), 1u);
    r.OnSenderFenced(0, kT0, &actions);
    EXPECT_EQ(r.state(), SessionState::kError);
  }
}

TEST(ReceiverSessionTest, DisagreeingAuxTokensAreDataLoss) {
  ReceiverSession r(TwoSliceRequest());
  std::vector<SessionAction> actions;
  r.Start({{0, 1}, {1, 1}}, &actions);
  r.OnAuxTokens(Aux(0, {1, 2}), kT0, &actions);
  r.OnAuxTokens(Aux(1, {1, 3}), kT0, &actions);
  EXPECT_THAT(r.error(), StatusIs(absl::StatusCode::kDataLoss));
}

TEST(ReceiverSessionTest, StrangersAndUnknownSlicesAreIgnored) {
  ReceiverSession r(TwoSliceRequest());
  std::vector<SessionAction> actions;
  r.Start({{0, 1}}, &actions);
  r.OnResult(Result(0, 9, SliceOutcome::kFailed), kT0, &actions);
  r.OnResult(Result(5, 0, SliceOutcome::kFailed), kT0, &actions);
  r.OnAuxTokens(Aux(9, {1}), kT0, &actions);
  EXPECT_OK(r.error());
  EXPECT_EQ(r.state(), SessionState::kReady);
}

TEST(ReceiverSessionTest, FenceOfASenderThatDeliveredEverythingChangesNothing) {
  ReceiverSession r(TwoSliceRequest());
  std::vector<SessionAction> actions;
  r.Start({{0, 1}, {1, 1}}, &actions);
  r.OnResult(Result(0, 0, SliceOutcome::kSuccess), kT0, &actions);
  r.OnResult(Result(1, 0, SliceOutcome::kSuccess), kT0, &actions);
  r.OnSenderFenced(0, kT0, &actions);  // For another request's sake.
  EXPECT_OK(r.error());
  r.OnSenderFenced(1, kT0, &actions);
  EXPECT_THAT(r.error(), StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_EQ(r.state(), SessionState::kError);
}

// Regression (issue 11, session_fuzzer): a request the transceiver fails before it
// starts (no rank of the context instance overlaps this one) stayed in INIT for
// ever, so the engine never saw it end.
TEST(ReceiverSessionTest, FailureBeforeStartEndsTheRequest) {
  {
    ReceiverSession r(TwoSliceRequest());
    std::vector<SessionAction> actions;
    r.Fail(absl::UnavailableError("no rank of the context instance overlaps this one"), kT0,
           &actions);
    EXPECT_EQ(r.state(), SessionState::kError);
    EXPECT_THAT(actions, IsEmpty());  // It expects no sender: nobody to tell.
    EXPECT_EQ(r.next_deadline(), absl::InfiniteFuture());
    r.Start({{0, 1}}, &actions);
    EXPECT_THAT(actions, IsEmpty());
  }
  {
    ReceiverSession r(TwoSliceRequest());
    std::vector<SessionAction> actions;
    r.Cancel("engine gave up", kT0, &actions);
    EXPECT_EQ(r.state(), SessionState::kCancelled);
  }
  {
    // Before Start and before its deadline, a timer changes nothing.
    ReceiverSession r(TwoSliceRequest());
    std::vector<SessionAction> actions;
    r.OnDeadline(kT0, &actions);
    EXPECT_EQ(r.state(), SessionState::kInit);
  }
}

}  // namespace
}  // namespace kvx::transfer
