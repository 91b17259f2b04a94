#include "testing/token_oracle.h"

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/strings/str_cat.h"

namespace kvx::testing {
namespace {

// Whether any position of block `b` satisfies `pred`, by walking positions.
template <typename Pred>
bool AnyPosition(int64_t b, int64_t tpb, Pred pred) {
  for (int64_t t = b * tpb; t < (b + 1) * tpb; ++t) {
    if (pred(t)) return true;
  }
  return false;
}

}  // namespace

OracleResult ExpectedMoves(const OracleScenario& s) {
  OracleResult result;
  result.pairs.resize(s.groups.size());
  const int64_t tpb = s.tokens_per_block;
  const int64_t end = s.slice_end.value_or(s.prompt_len);
  for (size_t g = 0; g < s.groups.size(); ++g) {
    const OracleGroup& group = s.groups[g];
    if (group.mamba) continue;
    for (int64_t b = 0; b * tpb < end; ++b) {
      const bool in_window =
          !group.window || AnyPosition(b, tpb, [&](int64_t t) {
            return t >= s.prompt_len + 1 - *group.window;
          });
      const bool lacking =
          AnyPosition(b, tpb, [&](int64_t t) { return t >= s.receiver_cached_tokens; });
      if (!in_window) continue;
      const auto held = [b](const transfer::BlockList& table) {
        return b < static_cast<int64_t>(table.size()) && table[b] >= 0;
      };
      // The sender builds its slice without knowing the receiver's cache, so it
      // needs every block of the window; the receiver only the ones it lacks.
      const bool context_held = held(group.context_table);
      const bool generation_held = held(group.generation_table);
      if (!context_held || (lacking && !generation_held)) {
        result.feasible = false;
        result.why_infeasible =
            absl::StrCat("group=", g, " block=", b, " context_held=", context_held,
                         " generation_held=", generation_held, " lacking=", lacking);
        return result;
      }
      if (!lacking) continue;
      result.pairs[g].emplace_back(group.context_table[b], group.generation_table[b]);
    }
  }
  return result;
}

}  // namespace kvx::testing
