// File: transfer/session.h
//
// The per-request state machines of a transfer (SEMANTICS.md section 7) as pure
// bookkeeping: a SenderSession (one request on a context rank) and a
// ReceiverSession (one request on a generation rank) consume events (the engine's
// task, a peer's message, a transfer's outcome, a deadline) and append actions (send
// this message, post these writes, cancel those transfers, fence that rank). They do
// no I/O and hold no threads, so every ordering of messages can be tested and
// fuzzed; the transceiver executes their actions.
//
//   SenderSession sender(/*unique_rid=*/7, /*self_rank=*/0);
//   std::vector<SessionAction> actions;
//   sender.ExpectReceivers({0});
//   sender.AddSlice(0, built_slice, /*aux_tokens=*/{42}, deadline, &actions);
//   sender.OnRequestData(request_data, &actions);
//   // actions: PostSlice{slice 0, receiver 0}; the transceiver plans and posts, then
//   sender.OnSliceEnded(0, 0, SliceOutcomeInfo{}, &actions);
//   // actions: SendMessage{0, SliceResult{kSuccess}}, SendMessage{0, AuxTokens{42}}
//
// State machine (both sides; SessionState):
//
//   kInit -> kReady -> kTransferring -> kKvTransferred -> kFullyTransferred
//     \________\____________\_______________\--> kError | kCancelled
//
//   Sender: kReady once request data for every expected receiver of the first slice
//   arrived; kKvTransferred once every (slice, receiver) pair of every slice up to
//   the last was delivered and reported; kFullyTransferred once the auxiliary tokens
//   went out with it.
//   Receiver: kReady once the request data went out; kKvTransferred once every
//   expected sender reported SUCCESS for every slice; kFullyTransferred once the
//   auxiliary tokens arrived too.
//
// Invariants:
//   1. Final states (kFullyTransferred, kError, kCancelled) are entered only when
//      nothing of the request is in flight: a sender has no posted transfer that has
//      not ended (quiesced); a receiver has, from every expected sender, a settled
//      result for every slice or a fence of that sender. So a final state means the
//      engine may release the request's pages (SEMANTICS.md section 7).
//   2. Each (slice, receiver) pair is dispatched at most once (PostSlice), whichever
//      of the engine's task and the request data came first; a repeated identical
//      RequestData is ignored, a conflicting one fails the request.
//   3. Each (slice, receiver) pair gets exactly one SliceResult: SUCCESS once its
//      writes are delivered, FAILED otherwise (also for a pair never posted).
//   4. The first error wins; later errors only count.
//   5. A Cancel from a sender tells a receiver that nothing of the request from
//      that sender is in flight to it or ever will be (its results so far stand):
//      a sender sends one only after the request failed, once every pair it posted
//      to that receiver ended and none unsettled, also in answer to the receiver's
//      own Cancel for slices whose request data never came. The receiver then
//      counts that sender done and need not fence it, so a lost or cut message
//      fails its request alone, not every request in flight with the sender.
//
// Thread safety: none; one thread (the transceiver's) drives a session.

#ifndef KVX_TRANSFER_SESSION_H_
#define KVX_TRANSFER_SESSION_H_

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "transfer/protocol.h"
#include "transfer/slice.h"

namespace kvx::transfer {

enum class SessionState {
  kInit,
  kReady,
  kTransferring,
  kKvTransferred,
  kFullyTransferred,
  kError,
  kCancelled,
};

absl::string_view SessionStateName(SessionState state);
inline bool IsFinal(SessionState state) {
  return state == SessionState::kFullyTransferred || state == SessionState::kError ||
         state == SessionState::kCancelled;
}

// Send `message` to rank `peer_rank` of the peer instance.
struct SendMessage {
  int64_t peer_rank = 0;
  Message message;
};
// Sender: pair, plan and post slice `slice_id` for `receiver_rank` (the session
// holds both the slice and the request data), then report with OnSliceEnded.
struct PostSlice {
  int64_t slice_id = 0;
  int64_t receiver_rank = 0;
};
// Sender: cancel every posted transfer of the request (each still ends with
// OnSliceEnded once it has quiesced).
struct CancelPosted {};
// Receiver: the sender may still write into the request's pages; fence it (the
// transport's RemovePeer) and report with OnSenderFenced.
struct FenceSender {
  int64_t sender_rank = 0;
};
using SessionAction = std::variant<SendMessage, PostSlice, CancelPosted, FenceSender>;

// How one posted (slice, receiver) pair ended.
struct SliceOutcomeInfo {
  absl::Status status;     // OK: every byte delivered (or an empty write)
  bool settled = true;     // !status.ok(): nothing of it can land any more
  uint64_t bytes = 0;
  int64_t writes = 0;
  int64_t staged_chunks = 0;  // of `writes`, those that went through staging
};

class SenderSession {
 public:
  SenderSession(uint64_t unique_rid, int64_t self_rank)
      : unique_rid_(unique_rid), self_rank_(self_rank) {}

  // The generation ranks that overlap this rank for this request (the transceiver
  // derives them from the topologies and the request's DP rank). Set once, before
  // or with the first request data; request data from any other rank is answered
  // FAILED and otherwise ignored.
  void ExpectReceivers(std::vector<int64_t> receiver_ranks);
  bool receivers_known() const { return receivers_known_; }

  // The engine's task for slice `slice_id` (0, 1, ... in prompt order; the last one
  // has slice.is_last_slice) with the auxiliary tokens to send after the last.
  // Returns InvalidArgument for a slice id given twice or past the last slice; the
  // session is failed then.
  absl::Status AddSlice(int64_t slice_id, KVSlice slice, std::vector<int64_t> aux_tokens,
                        absl::Time deadline, std::vector<SessionAction>* out);

  // A receiver's request data, already decoded and checked to come from a rank of
  // the peer instance. Duplicates are ignored; a conflicting duplicate fails the
  // request (InvalidArgument).
  void OnRequestData(const RequestData& data, std::vector<SessionAction>* out);

  // A PostSlice pair ended (delivered, failed and quiesced, or never posted).
  void OnSliceEnded(int64_t slice_id, int64_t receiver_rank, const SliceOutcomeInfo& outcome,
                    std::vector<SessionAction>* out);

  // Cancel from the engine or a receiver (`code` Aborted) or any other failure that
  // ends the request; reported to every receiver.
  void Fail(absl::Status error, std::vector<SessionAction>* out);
  void Cancel(absl::string_view reason, std::vector<SessionAction>* out);
  // A receiver's Cancel: Cancel, and once nothing of the request is in flight to
  // `receiver` a Cancel back (invariant 5); none when a write to it failed
  // unsettled (it fences this rank then).
  void OnReceiverCancel(int64_t receiver, absl::string_view reason,
                        std::vector<SessionAction>* out);

  // Called when `now` passes deadline(): fails the request with DeadlineExceeded
  // unless it is final.
  void OnDeadline(absl::Time now, std::vector<SessionAction>* out);
  absl::Time deadline() const { return deadline_; }

  SessionState state() const { return state_; }
  const absl::Status& error() const { return error_; }
  uint64_t unique_rid() const { return unique_rid_; }

  // What PostSlice needs; null when absent.
  const KVSlice* slice(int64_t slice_id) const;
  const RequestData* request_data(int64_t slice_id, int64_t receiver_rank) const;

  // Totals over delivered pairs.
  uint64_t bytes() const { return bytes_; }
  int64_t writes() const { return writes_; }

 private:
  enum class PairState { kPosted, kDelivered, kReported };
  using PairKey = std::pair<int64_t, int64_t>;  // (slice, receiver)

  void Dispatch(int64_t slice_id, std::vector<SessionAction>* out);
  void ReportFailed(int64_t slice_id, int64_t receiver, const absl::Status& error,
                    bool settled, std::vector<SessionAction>* out);
  void Advance(std::vector<SessionAction>* out);
  void CancelIfAllDelivered(int64_t receiver, std::vector<SessionAction>* out);
  // Answers the receivers in `to_answer_` that nothing is in flight to any more.
  void AnswerCancels(std::vector<SessionAction>* out);
  bool Expected(int64_t receiver) const { return receivers_.count(receiver) > 0; }

  const uint64_t unique_rid_;
  const int64_t self_rank_;
  bool receivers_known_ = false;
  std::set<int64_t> receivers_;
  std::map<int64_t, KVSlice> slices_;
  std::optional<int64_t> last_slice_;
  std::vector<int64_t> aux_tokens_;
  std::map<PairKey, RequestData> data_;
  std::map<PairKey, PairState> pairs_;
  std::set<int64_t> to_answer_;   // receivers whose Cancel awaits the Cancel back
  std::set<int64_t> unsettled_;   // receivers a write to failed unsettled
  absl::Time deadline_ = absl::InfiniteFuture();
  SessionState state_ = SessionState::kInit;
  absl::Status error_;
  bool cancelled_ = false;
  bool aux_sent_ = false;
  uint64_t bytes_ = 0;
  int64_t writes_ = 0;
};

// One slice a receiver asks for, as BuildSlice built it.
struct ReceiverSlice {
  int64_t slice_id = 0;
  KVSlice slice;
};

// What a ReceiverSession needs to write its request data.
struct ReceiverRequest {
  uint64_t unique_rid = 0;
  int64_t self_rank = 0;
  int64_t prompt_len = 0;
  int64_t dp_rank = 0;
  std::optional<int64_t> dst_start_token;
  std::optional<int64_t> aux_slot;
  std::optional<int64_t> state_slot;
  std::vector<ReceiverSlice> slices;  // slice ids 0..n-1, the last is_last_slice
  absl::Time deadline = absl::InfiniteFuture();
  // After a failure or the deadline, how long senders get to report (settled)
  // before they are fenced.
  absl::Duration report_grace = absl::Seconds(2);
};

class ReceiverSession {
 public:
  explicit ReceiverSession(ReceiverRequest request) : request_(std::move(request)) {}

  // Sends the request data for every slice to every sender in `grant_epochs`
  // (sender rank -> the epoch of the grants this rank gave it). REQUIRES: not empty.
  void Start(const std::map<int64_t, uint64_t>& grant_epochs, std::vector<SessionAction>* out);

  // Events that may start a failure take `now`: senders then get report_grace to
  // report before they are fenced.
  // A sender's result. One per (slice, sender) counts; repeats are ignored, as are
  // results from ranks that are not expected senders or for unknown slices.
  void OnResult(const SliceResult& result, absl::Time now, std::vector<SessionAction>* out);
  // A sender's auxiliary tokens: the first copy is kept; a different one fails the
  // request (DataLoss: the senders disagree).
  void OnAuxTokens(const AuxTokens& aux, absl::Time now, std::vector<SessionAction>* out);
  // Cancel from the engine or a sender.
  void Cancel(absl::string_view reason, absl::Time now, std::vector<SessionAction>* out);
  // A sender's Cancel: Cancel, and nothing more of the request comes from `sender`
  // (invariant 5): it is done once its results so far are settled.
  void OnSenderCancel(int64_t sender, absl::string_view reason, absl::Time now,
                      std::vector<SessionAction>* out);
  void Fail(absl::Status error, absl::Time now, std::vector<SessionAction>* out);
  // `sender` was fenced (for this request or another): nothing of it lands any more.
  void OnSenderFenced(int64_t sender, absl::Time now, std::vector<SessionAction>* out);
  // Called when `now` passes next_deadline().
  void OnDeadline(absl::Time now, std::vector<SessionAction>* out);
  absl::Time next_deadline() const;

  SessionState state() const { return state_; }
  const absl::Status& error() const { return error_; }
  const std::vector<int64_t>& aux_tokens() const { return aux_; }
  const ReceiverRequest& request() const { return request_; }
  bool waits_on(int64_t sender) const;
  uint64_t bytes() const { return bytes_; }
  int64_t writes() const { return writes_; }

 private:
  using PairKey = std::pair<int64_t, int64_t>;  // (slice, sender)
  enum class Report { kSuccess, kFailedSettled, kFailedUnsettled };

  void BeginFailure(absl::Status error, bool cancelled, absl::Time now,
                    std::vector<SessionAction>* out);
  void Advance(std::vector<SessionAction>* out);
  bool SenderDone(int64_t sender) const;

  ReceiverRequest request_;
  std::set<int64_t> senders_;
  std::map<PairKey, Report> reports_;
  std::set<int64_t> fenced_;
  std::set<int64_t> fence_asked_;
  std::set<int64_t> released_;  // senders that said nothing more comes (invariant 5)
  std::optional<std::vector<int64_t>> aux_received_;
  std::vector<int64_t> aux_;
  SessionState state_ = SessionState::kInit;
  absl::Status error_;
  bool failing_ = false;
  bool cancelled_ = false;
  absl::Time grace_deadline_ = absl::InfiniteFuture();
  uint64_t bytes_ = 0;
  int64_t writes_ = 0;
};

}  // namespace kvx::transfer

#endif  // KVX_TRANSFER_SESSION_H_
