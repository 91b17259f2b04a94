#include "transfer/session.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "transfer/protocol.h"
#include "transfer/slice.h"

namespace kvx::transfer {
namespace {

// What the wire carries of a failure: its code and a bounded reason.
constexpr size_t kMaxReasonBytes = 1024;

std::string BoundedReason(absl::string_view message) {
  return std::string(message.substr(0, kMaxReasonBytes));
}

bool SameRequestData(const RequestData& a, const RequestData& b) {
  return a.unique_rid == b.unique_rid && a.slice_id == b.slice_id &&
         a.receiver_rank == b.receiver_rank && a.prompt_len == b.prompt_len &&
         a.token_start == b.token_start && a.token_end == b.token_end &&
         a.is_last_slice == b.is_last_slice && a.block_ids_per_group == b.block_ids_per_group &&
         a.dst_start_token == b.dst_start_token && a.aux_slot == b.aux_slot &&
         a.state_slot == b.state_slot && a.dp_rank == b.dp_rank &&
         a.grant_epoch == b.grant_epoch;
}

}  // namespace

absl::string_view SessionStateName(SessionState state) {
  switch (state) {
    case SessionState::kInit:
      return "INIT";
    case SessionState::kReady:
      return "READY";
    case SessionState::kTransferring:
      return "TRANSFERRING";
    case SessionState::kKvTransferred:
      return "KV_TRANSFERRED";
    case SessionState::kFullyTransferred:
      return "FULLY_TRANSFERRED";
    case SessionState::kError:
      return "ERROR";
    case SessionState::kCancelled:
      return "CANCELLED";
  }
  return "UNKNOWN";
}

// --- SenderSession -----------------------------------------------------------------

void SenderSession::ExpectReceivers(std::vector<int64_t> receiver_ranks) {
  if (receivers_known_) return;
  receivers_known_ = true;
  receivers_.insert(receiver_ranks.begin(), receiver_ranks.end());
}

absl::Status SenderSession::AddSlice(int64_t slice_id, KVSlice slice,
                                     std::vector<int64_t> aux_tokens, absl::Time deadline,
                                     std::vector<SessionAction>* out) {
  deadline_ = deadline;
  if (IsFinal(state_) || !error_.ok()) return absl::OkStatus();  // Cancelled first.
  absl::Status invalid;
  if (slice_id < 0 || slices_.count(slice_id) > 0) {
    invalid = absl::InvalidArgumentError(absl::StrCat(
        "slice given twice or negative: request=", unique_rid_, " slice=", slice_id));
  } else if (last_slice_.has_value() && slice_id > *last_slice_) {
    invalid = absl::InvalidArgumentError(absl::StrCat("slice past the last slice: request=",
                                                      unique_rid_, " slice=", slice_id,
                                                      " last_slice=", *last_slice_));
  } else if (slice.is_last_slice) {
    if (!slices_.empty() && slices_.rbegin()->first > slice_id) {
      invalid = absl::InvalidArgumentError(
          absl::StrCat("last slice before a later one: request=", unique_rid_,
                       " slice=", slice_id, " later=", slices_.rbegin()->first));
    }
  }
  // The receiver's request data says which slice is last too; they must agree,
  // and request data for a slice past the last fails the request (Fail answers it).
  for (const auto& [key, data] : data_) {
    if (!invalid.ok()) break;
    if (key.first == slice_id && data.is_last_slice != slice.is_last_slice) {
      invalid = absl::InvalidArgumentError(absl::StrCat(
          "sender and receiver disagree on the last slice: request=", unique_rid_,
          " slice=", slice_id, " receiver=", key.second));
    } else if (slice.is_last_slice && key.first > slice_id) {
      invalid = absl::InvalidArgumentError(absl::StrCat(
          "request data names a slice past the last slice: request=", unique_rid_,
          " slice=", key.first, " receiver=", key.second, " last_slice=", slice_id));
    }
  }
  if (!invalid.ok()) {
    Fail(invalid, out);
    return invalid;
  }
  if (slice.is_last_slice) {
    last_slice_ = slice_id;
    aux_tokens_ = std::move(aux_tokens);
  }
  slices_.emplace(slice_id, std::move(slice));
  Dispatch(slice_id, out);
  Advance(out);
  return absl::OkStatus();
}

void SenderSession::OnRequestData(const RequestData& data, std::vector<SessionAction>* out) {
  const int64_t receiver = data.receiver_rank;
  const PairKey key{data.slice_id, receiver};
  if (!Expected(receiver)) {
    // Not a rank this one writes to for this request: answer it, touch nothing.
    SliceResult result;
    result.unique_rid = unique_rid_;
    result.slice_id = data.slice_id;
    result.sender_rank = self_rank_;
    result.outcome = SliceOutcome::kFailed;
    result.is_last_slice = data.is_last_slice;
    result.code = static_cast<int32_t>(absl::StatusCode::kInvalidArgument);
    result.reason = absl::StrCat("rank does not overlap the receiver for this request: sender=",
                                 self_rank_, " receiver=", receiver);
    out->push_back(SendMessage{receiver, std::move(result)});
    return;
  }
  auto existing = data_.find(key);
  if (existing != data_.end()) {
    if (!SameRequestData(existing->second, data)) {
      Fail(absl::InvalidArgumentError(absl::StrCat(
               "conflicting request data for one slice: request=", unique_rid_,
               " slice=", data.slice_id, " receiver=", receiver)),
           out);
    }
    return;  // Invariant 2: a repeat is not a second dispatch.
  }
  if (data.slice_id < 0 || (last_slice_.has_value() && data.slice_id > *last_slice_) ||
      (last_slice_.has_value() && data.is_last_slice && data.slice_id != *last_slice_)) {
    data_.emplace(key, data);
    absl::Status invalid = absl::InvalidArgumentError(absl::StrCat(
        "request data names a slice this request does not have: request=", unique_rid_,
        " slice=", data.slice_id, " receiver=", receiver,
        " last_slice=", last_slice_.value_or(-1)));
    if (IsFinal(state_) || !error_.ok()) {
      // Fail would change nothing, yet the pair still gets its one answer
      // (invariant 3); nothing was posted for it, so it is settled.
      ReportFailed(data.slice_id, receiver, error_.ok() ? invalid : error_, true, out);
    } else {
      Fail(std::move(invalid), out);  // answers this pair with the others
    }
    return;
  }
  data_.emplace(key, data);
  if (!error_.ok()) {
    // Late request data for a failed or cancelled request: it still gets its one
    // answer (invariant 3); nothing was posted, so it is settled.
    ReportFailed(data.slice_id, receiver, error_, /*settled=*/true, out);
    Advance(out);
    return;
  }
  if (slices_.count(data.slice_id) > 0) {
    auto slice = slices_.find(data.slice_id);
    if (slice->second.is_last_slice != data.is_last_slice) {
      Fail(absl::InvalidArgumentError(absl::StrCat(
               "sender and receiver disagree on the last slice: request=", unique_rid_,
               " slice=", data.slice_id, " receiver=", receiver)),
           out);
      return;
    }
    pairs_[key] = PairState::kPosted;
    out->push_back(PostSlice{data.slice_id, receiver});
  }
  Advance(out);
}

void SenderSession::Dispatch(int64_t slice_id, std::vector<SessionAction>* out) {
  for (const auto& [key, data] : data_) {
    if (key.first != slice_id || pairs_.count(key) > 0) continue;
    pairs_[key] = PairState::kPosted;
    out->push_back(PostSlice{key.first, key.second});
  }
}

void SenderSession::OnSliceEnded(int64_t slice_id, int64_t receiver_rank,
                                 const SliceOutcomeInfo& outcome,
                                 std::vector<SessionAction>* out) {
  auto pair = pairs_.find({slice_id, receiver_rank});
  if (pair == pairs_.end() || pair->second != PairState::kPosted) return;
  if (outcome.status.ok()) {
    // Delivered, even if the request failed meanwhile: SUCCESS is the truth.
    pair->second = PairState::kDelivered;
    bytes_ += outcome.bytes;
    writes_ += outcome.writes;
    SliceResult result;
    result.unique_rid = unique_rid_;
    result.slice_id = slice_id;
    result.sender_rank = self_rank_;
    result.outcome = SliceOutcome::kSuccess;
    auto slice = slices_.find(slice_id);
    result.is_last_slice = slice != slices_.end() && slice->second.is_last_slice;
    result.bytes = outcome.bytes;
    result.writes = outcome.writes;
    result.staged_chunks = outcome.staged_chunks;
    out->push_back(SendMessage{receiver_rank, std::move(result)});
    if (!error_.ok()) CancelIfAllDelivered(receiver_rank, out);
  } else {
    ReportFailed(slice_id, receiver_rank, outcome.status, outcome.settled, out);
    if (error_.ok()) {
      Fail(absl::Status(outcome.status.code(),
                        absl::StrCat("slice failed: request=", unique_rid_, " slice=", slice_id,
                                     " receiver=", receiver_rank, ": ",
                                     outcome.status.message())),
           out);
    }
  }
  AnswerCancels(out);
  Advance(out);
}

void SenderSession::ReportFailed(int64_t slice_id, int64_t receiver, const absl::Status& error,
                                 bool settled, std::vector<SessionAction>* out) {
  pairs_[{slice_id, receiver}] = PairState::kReported;
  if (!settled) unsettled_.insert(receiver);
  SliceResult result;
  result.unique_rid = unique_rid_;
  result.slice_id = slice_id;
  result.sender_rank = self_rank_;
  result.outcome = SliceOutcome::kFailed;
  auto data = data_.find({slice_id, receiver});
  result.is_last_slice = data != data_.end() && data->second.is_last_slice;
  result.code = static_cast<int32_t>(error.code());
  result.reason = BoundedReason(error.message());
  result.settled = settled;
  out->push_back(SendMessage{receiver, std::move(result)});
}

void SenderSession::Fail(absl::Status error, std::vector<SessionAction>* out) {
  if (IsFinal(state_) || !error_.ok()) return;  // Invariant 4.
  error_ = std::move(error);
  bool posted = false;
  for (const auto& [key, state] : pairs_) posted |= state == PairState::kPosted;
  if (posted) out->push_back(CancelPosted{});
  // Every pair asked for but never posted gets its FAILED now (invariant 3).
  for (const auto& [key, data] : data_) {
    if (pairs_.count(key) == 0) ReportFailed(key.first, key.second, error_, true, out);
  }
  for (int64_t receiver : receivers_) CancelIfAllDelivered(receiver, out);
  Advance(out);
}

// A receiver whose every pair was delivered (SUCCESS sent) would wait for the
// auxiliary tokens, which a failed request never sends: it hears the failure as a
// cancel. Called once the request has failed, when no pair of it is in flight.
void SenderSession::CancelIfAllDelivered(int64_t receiver, std::vector<SessionAction>* out) {
  if (aux_sent_) return;
  bool asked = false;
  for (const auto& [key, state] : pairs_) {
    if (key.second != receiver) continue;
    if (state != PairState::kDelivered) return;
    asked = true;
  }
  if (!asked) return;
  transfer::Cancel cancel;
  cancel.unique_rid = unique_rid_;
  cancel.sender_rank = self_rank_;
  cancel.from = Role::kContext;
  cancel.reason = BoundedReason(error_.message());
  out->push_back(SendMessage{receiver, std::move(cancel)});
}

void SenderSession::Cancel(absl::string_view reason, std::vector<SessionAction>* out) {
  if (IsFinal(state_) || !error_.ok()) return;
  cancelled_ = true;
  Fail(absl::AbortedError(absl::StrCat("request cancelled: request=", unique_rid_, ": ", reason)),
       out);
}

void SenderSession::OnReceiverCancel(int64_t receiver, absl::string_view reason,
                                     std::vector<SessionAction>* out) {
  Cancel(reason, out);
  to_answer_.insert(receiver);
  AnswerCancels(out);
}

void SenderSession::AnswerCancels(std::vector<SessionAction>* out) {
  for (auto it = to_answer_.begin(); it != to_answer_.end();) {
    const int64_t receiver = *it;
    bool in_flight = false;
    for (const auto& [key, state] : pairs_) {
      in_flight |= key.second == receiver && state == PairState::kPosted;
    }
    if (in_flight) {
      ++it;
      continue;
    }
    if (unsettled_.count(receiver) == 0) {
      transfer::Cancel cancel;
      cancel.unique_rid = unique_rid_;
      cancel.sender_rank = self_rank_;
      cancel.from = Role::kContext;
      cancel.reason = BoundedReason(error_.ok() ? absl::string_view("request ended")
                                                : error_.message());
      out->push_back(SendMessage{receiver, std::move(cancel)});
    }
    it = to_answer_.erase(it);
  }
}

void SenderSession::OnDeadline(absl::Time now, std::vector<SessionAction>* out) {
  if (IsFinal(state_) || now < deadline_) return;
  Fail(absl::DeadlineExceededError(absl::StrCat(
           "request not sent by its deadline: request=", unique_rid_,
           " slices_given=", slices_.size(), " request_data=", data_.size(),
           " pairs_done=",
           std::count_if(pairs_.begin(), pairs_.end(),
                         [](const auto& p) { return p.second == PairState::kDelivered; }))),
       out);
}

const KVSlice* SenderSession::slice(int64_t slice_id) const {
  auto it = slices_.find(slice_id);
  return it == slices_.end() ? nullptr : &it->second;
}

const RequestData* SenderSession::request_data(int64_t slice_id, int64_t receiver_rank) const {
  auto it = data_.find({slice_id, receiver_rank});
  return it == data_.end() ? nullptr : &it->second;
}

void SenderSession::Advance(std::vector<SessionAction>* out) {
  if (IsFinal(state_)) return;
  bool in_flight = false;
  for (const auto& [key, state] : pairs_) in_flight |= state == PairState::kPosted;
  if (!error_.ok()) {
    // Invariant 1: final only once nothing is in flight.
    if (!in_flight) state_ = cancelled_ ? SessionState::kCancelled : SessionState::kError;
    return;
  }
  if (state_ == SessionState::kInit && receivers_known_) {
    bool ready = !receivers_.empty();
    for (int64_t r : receivers_) ready &= data_.count({0, r}) > 0;
    if (ready) state_ = SessionState::kReady;
  }
  if (!pairs_.empty() && state_ < SessionState::kTransferring) {
    state_ = SessionState::kTransferring;
  }
  if (!last_slice_.has_value() || !receivers_known_) return;
  for (int64_t s = 0; s <= *last_slice_; ++s) {
    for (int64_t r : receivers_) {
      auto pair = pairs_.find({s, r});
      if (pair == pairs_.end() || pair->second != PairState::kDelivered) return;
    }
  }
  state_ = SessionState::kKvTransferred;
  if (!aux_sent_) {
    aux_sent_ = true;
    for (int64_t r : receivers_) {
      AuxTokens aux;
      aux.unique_rid = unique_rid_;
      aux.sender_rank = self_rank_;
      aux.aux_slot = data_.at({*last_slice_, r}).aux_slot;
      aux.tokens = aux_tokens_;
      out->push_back(SendMessage{r, std::move(aux)});
    }
  }
  state_ = SessionState::kFullyTransferred;
}

// --- ReceiverSession ---------------------------------------------------------------

void ReceiverSession::Start(const std::map<int64_t, uint64_t>& grant_epochs,
                            std::vector<SessionAction>* out) {
  if (state_ != SessionState::kInit || failing_) return;
  for (const auto& [sender, epoch] : grant_epochs) {
    senders_.insert(sender);
    for (const ReceiverSlice& s : request_.slices) {
      RequestData data;
      data.unique_rid = request_.unique_rid;
      data.slice_id = s.slice_id;
      data.receiver_rank = request_.self_rank;
      data.prompt_len = request_.prompt_len;
      data.token_start = s.slice.token_range.has_value() ? s.slice.token_range->start() : 0;
      data.token_end = s.slice.token_range.has_value() ? s.slice.token_range->end() : 0;
      data.is_last_slice = s.slice.is_last_slice;
      data.block_ids_per_group = s.slice.block_ids_per_layer_group;
      data.dst_start_token = request_.dst_start_token;
      data.aux_slot = request_.aux_slot;
      data.state_slot = request_.state_slot;
      data.dp_rank = request_.dp_rank;
      data.grant_epoch = epoch;
      out->push_back(SendMessage{sender, std::move(data)});
    }
  }
  state_ = SessionState::kReady;
}

void ReceiverSession::OnResult(const SliceResult& result, absl::Time now,
                               std::vector<SessionAction>* out) {
  const int64_t sender = result.sender_rank;
  if (IsFinal(state_) || senders_.count(sender) == 0 || result.slice_id < 0 ||
      result.slice_id >= static_cast<int64_t>(request_.slices.size()) ||
      fenced_.count(sender) > 0) {
    return;
  }
  const PairKey key{result.slice_id, sender};
  if (reports_.count(key) > 0) return;  // One result per pair counts.
  if (result.outcome == SliceOutcome::kSuccess) {
    reports_[key] = Report::kSuccess;
    bytes_ += result.bytes;
    writes_ += result.writes;
    if (state_ < SessionState::kTransferring) state_ = SessionState::kTransferring;
  } else {
    reports_[key] = result.settled ? Report::kFailedSettled : Report::kFailedUnsettled;
    if (!result.settled && fence_asked_.insert(sender).second) {
      out->push_back(FenceSender{sender});
    }
    const absl::StatusCode code = static_cast<absl::StatusCode>(result.code);
    BeginFailure(absl::Status(code == absl::StatusCode::kOk ? absl::StatusCode::kUnknown : code,
                              absl::StrCat("sender failed the slice: request=",
                                           request_.unique_rid, " slice=", result.slice_id,
                                           " sender=", sender, ": ", result.reason)),
                 /*cancelled=*/false, now, out);
  }
  Advance(out);
}

void ReceiverSession::OnAuxTokens(const AuxTokens& aux, absl::Time now,
                                  std::vector<SessionAction>* out) {
  if (IsFinal(state_) || senders_.count(aux.sender_rank) == 0) return;
  if (!aux_received_.has_value()) {
    aux_received_ = aux.tokens;
    aux_ = aux.tokens;
  } else if (*aux_received_ != aux.tokens) {
    BeginFailure(absl::DataLossError(absl::StrCat(
                     "senders disagree on the auxiliary tokens: request=", request_.unique_rid,
                     " sender=", aux.sender_rank)),
                 false, now, out);
  }
  Advance(out);
}

void ReceiverSession::Cancel(absl::string_view reason, absl::Time now,
                             std::vector<SessionAction>* out) {
  BeginFailure(absl::AbortedError(absl::StrCat("request cancelled: request=",
                                               request_.unique_rid, ": ", reason)),
               /*cancelled=*/true, now, out);
  Advance(out);
}

void ReceiverSession::OnSenderCancel(int64_t sender, absl::string_view reason, absl::Time now,
                                     std::vector<SessionAction>* out) {
  if (!IsFinal(state_) && senders_.count(sender) > 0) released_.insert(sender);
  Cancel(reason, now, out);
}

void ReceiverSession::Fail(absl::Status error, absl::Time now,
                           std::vector<SessionAction>* out) {
  BeginFailure(std::move(error), false, now, out);
  Advance(out);
}

void ReceiverSession::OnSenderFenced(int64_t sender, absl::Time now,
                                     std::vector<SessionAction>* out) {
  if (IsFinal(state_) || senders_.count(sender) == 0) return;
  fenced_.insert(sender);
  if (!failing_) {
    // Fenced before it delivered everything: it never will.
    bool all_success = true;
    for (const ReceiverSlice& s : request_.slices) {
      auto report = reports_.find({s.slice_id, sender});
      all_success &= report != reports_.end() && report->second == Report::kSuccess;
    }
    if (!all_success) {
      BeginFailure(absl::UnavailableError(absl::StrCat(
                       "sender was fenced before it delivered the request: request=",
                       request_.unique_rid, " sender=", sender)),
                   false, now, out);
    }
  }
  Advance(out);
}

void ReceiverSession::OnDeadline(absl::Time now, std::vector<SessionAction>* out) {
  if (IsFinal(state_)) return;
  if (!failing_ && now >= request_.deadline) {
    BeginFailure(absl::DeadlineExceededError(absl::StrCat(
                     "request not received by its deadline: request=", request_.unique_rid,
                     " results=", reports_.size(), " expected=",
                     senders_.size() * request_.slices.size(),
                     " aux=", aux_received_.has_value() ? "yes" : "no")),
                 false, now, out);
  }
  if (failing_ && now >= grace_deadline_) {
    // Invariant 1: a sender that has not settled everything by now is fenced.
    for (int64_t sender : senders_) {
      if (!SenderDone(sender) && fence_asked_.insert(sender).second) {
        out->push_back(FenceSender{sender});
      }
    }
  }
  Advance(out);
}

absl::Time ReceiverSession::next_deadline() const {
  if (IsFinal(state_)) return absl::InfiniteFuture();
  return failing_ ? grace_deadline_ : request_.deadline;
}

bool ReceiverSession::waits_on(int64_t sender) const {
  return !IsFinal(state_) && senders_.count(sender) > 0 && !SenderDone(sender);
}

void ReceiverSession::BeginFailure(absl::Status error, bool cancelled, absl::Time now,
                                   std::vector<SessionAction>* out) {
  if (IsFinal(state_) || failing_) return;  // Invariant 4.
  failing_ = true;
  cancelled_ = cancelled;
  error_ = std::move(error);
  grace_deadline_ = now + request_.report_grace;
  // Every sender still owing results stops and reports (settled or not).
  for (int64_t sender : senders_) {
    if (SenderDone(sender)) continue;
    transfer::Cancel cancel;
    cancel.unique_rid = request_.unique_rid;
    cancel.sender_rank = request_.self_rank;
    cancel.from = Role::kGeneration;
    cancel.reason = BoundedReason(error_.message());
    out->push_back(SendMessage{sender, std::move(cancel)});
  }
}

bool ReceiverSession::SenderDone(int64_t sender) const {
  if (fenced_.count(sender) > 0) return true;
  const bool released = released_.count(sender) > 0;
  for (const ReceiverSlice& s : request_.slices) {
    auto report = reports_.find({s.slice_id, sender});
    if (report == reports_.end() ? !released : report->second == Report::kFailedUnsettled) {
      return false;
    }
  }
  return true;
}

void ReceiverSession::Advance(std::vector<SessionAction>* out) {
  if (IsFinal(state_)) return;
  // A request that fails before Start (the transceiver finds no sender for it)
  // expects no sender, so nothing can land: it ends at once, or it would never end.
  if (failing_) {
    for (int64_t sender : senders_) {
      if (!SenderDone(sender)) return;
    }
    state_ = cancelled_ ? SessionState::kCancelled : SessionState::kError;
    return;
  }
  if (state_ == SessionState::kInit) return;  // Not started: nothing asked for yet.
  for (int64_t sender : senders_) {
    for (const ReceiverSlice& s : request_.slices) {
      auto report = reports_.find({s.slice_id, sender});
      if (report == reports_.end() || report->second != Report::kSuccess) return;
    }
  }
  state_ = SessionState::kKvTransferred;
  if (aux_received_.has_value()) state_ = SessionState::kFullyTransferred;
}

}  // namespace kvx::transfer
