// libFuzzer target for the control-plane codec (transfer/protocol.h): the input is
// the bytes of one message, as a peer would send them. For each input:
//
//   1. DecodeMessage never crashes, throws or runs long, and allocates boundedly
//      (libFuzzer's -malloc_limit_mb, -rss_limit_mb and -timeout enforce the last
//      two; .ci/run passes them). An error is one line that names the message
//      kind (or "message" when the kind is unknown) and carries a code the header
//      promises: InvalidArgument, ResourceExhausted, or a page table's
//      Unimplemented.
//   2. Whatever decodes round-trips: EncodeMessage of the value decodes again to an
//      equal value, whose encoding is the same bytes (the encoding is canonical),
//      and which is never longer than the input (the encoder writes the shortest
//      form of everything, the decoder accepts any).
//   3. Decoding under tight DecodeLimits agrees: what decodes there decodes under
//      the defaults to the same value, and what only the defaults admit is refused
//      as ResourceExhausted, never another error.
//
// A broken property aborts with the reason.
//
//   bazel build --config=fuzz //transfer:protocol_fuzzer
//   bazel-bin/transfer/protocol_fuzzer -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=256
//       -max_total_time=60 /tmp/corpus transfer/protocol_fuzzer_corpus
//
// Seeds: transfer/protocol_fuzzer_corpus, written by //transfer:fuzz_seeds.

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/string_view.h"
#include "testing/protocol_equality.h"
#include "transfer/protocol.h"

namespace kvx::transfer {
namespace {

[[noreturn]] void Broken(const std::string& what, const absl::Status& status) {
  std::fprintf(stderr, "protocol property broken: %s\nstatus: %s\n", what.c_str(),
               status.ToString().c_str());
  std::abort();
}

// Limits a few times over the seeds' sizes, so that the fuzzer reaches each one.
DecodeLimits TightLimits() {
  DecodeLimits limits;
  limits.max_message_bytes = 4096;
  limits.max_block_ids = 64;
  limits.max_groups = 4;
  limits.max_pools = 3;
  limits.max_layers = 48;
  limits.max_aux_tokens = 8;
  limits.max_ranks = 16;
  return limits;
}

void CheckError(const absl::Status& status) {
  const absl::StatusCode code = status.code();
  if (code != absl::StatusCode::kInvalidArgument &&
      code != absl::StatusCode::kResourceExhausted &&
      code != absl::StatusCode::kUnimplemented) {
    Broken("decoding error with a code the header does not promise", status);
  }
  const absl::string_view message = status.message();
  if (message.empty() || message.find('\n') != absl::string_view::npos) {
    Broken("decoding error is not one line", status);
  }
  // Every error names the kind, or "message" when the bytes do not show it.
  static constexpr absl::string_view kPrefixes[] = {
      "message", "RankInfoRequest", "RankInfoReply", "RequestData",
      "SliceResult", "AuxTokens", "Cancel", "StagedChunk", "StagingCredit"};
  for (absl::string_view prefix : kPrefixes) {
    if (absl::StartsWith(message, prefix)) return;
  }
  Broken("decoding error does not name the message kind", status);
}

}  // namespace
}  // namespace kvx::transfer

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvx::transfer;  // NOLINT: one function
  const absl::string_view bytes(reinterpret_cast<const char*>(data), size);
  const absl::StatusOr<Message> decoded = DecodeMessage(bytes);
  const absl::StatusOr<Message> tight = DecodeMessage(bytes, TightLimits());
  if (!tight.ok()) CheckError(tight.status());
  if (!decoded.ok()) {
    CheckError(decoded.status());
    if (tight.ok()) Broken("tight limits admit what the defaults refuse", decoded.status());
    return 0;
  }
  if (tight.ok() && !(*tight == *decoded)) {
    Broken("tight limits decode another value", absl::OkStatus());
  }
  if (!tight.ok() && tight.status().code() != absl::StatusCode::kResourceExhausted) {
    Broken("tight limits refuse a message for something else than a limit",
           tight.status());
  }

  // Property 2: the round trip.
  const std::string encoded = EncodeMessage(*decoded);
  if (encoded.size() > size) {
    Broken("the encoding of a decoded message is longer than the input: input=" +
               std::to_string(size) + " encoded=" + std::to_string(encoded.size()),
           absl::OkStatus());
  }
  const absl::StatusOr<Message> again = DecodeMessage(encoded);
  if (!again.ok()) Broken("a decoded message does not decode once re-encoded", again.status());
  if (!(*again == *decoded)) Broken("the round trip changes the message", absl::OkStatus());
  if (EncodeMessage(*again) != encoded) {
    Broken("the encoding of one value is not one byte string", absl::OkStatus());
  }
  return 0;
}
