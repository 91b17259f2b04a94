// Runs of both instances (in this process, or one side for a peer elsewhere) and
// their reports: JSON for machines, a table for people.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "nlohmann/json.hpp"
#include "tools/transceiver_harness.h"
#include "transfer/curve_key_files.h"
#include "transfer/scenario.h"
#include "transfer/transceiver/transceiver.h"

namespace kvx::harness {
namespace {

using nlohmann::json;

// The fields of a SideReport, once, for both directions of the JSON codec.
template <typename Visit>
void Fields(SideReport& r, Visit visit) {
  visit("role", r.role);
  visit("instance", r.instance);
  visit("shape", r.shape);
  visit("transport", r.transport);
  visit("ranks", r.ranks);
  visit("requests", r.requests);
  visit("succeeded", r.succeeded);
  visit("cancelled", r.cancelled);
  visit("failed", r.failed);
  visit("bytes", r.bytes);
  visit("writes", r.writes);
  visit("block_pairs", r.block_pairs);
  visit("block_pairs_skipped", r.block_pairs_skipped);
  visit("blocks_sent", r.blocks_sent);
  visit("blocks_skipped_reuse", r.blocks_skipped_reuse);
  visit("blocks_skipped_window", r.blocks_skipped_window);
  visit("bytes_checked", r.bytes_checked);
  visit("mismatches", r.mismatches);
  visit("late_writes", r.late_writes);
  visit("seconds", r.seconds);
  visit("latency_ms", r.latency_ms);
  visit("failures", r.failures);
  visit("handshakes", r.metrics.handshakes);
  visit("fences", r.metrics.fences);
  visit("bad_messages", r.metrics.bad_messages);
  visit("dropped_messages", r.metrics.dropped_messages);
}

std::string Gb(uint64_t bytes) { return absl::StrFormat("%.3f GB", bytes / 1e9); }

}  // namespace

double SideReport::percentile_ms(double p) const {
  if (latency_ms.empty()) return 0;
  std::vector<double> sorted = latency_ms;
  std::sort(sorted.begin(), sorted.end());
  // Nearest rank.
  const size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * sorted.size()));
  return sorted[std::min(sorted.size() - 1, rank == 0 ? 0 : rank - 1)];
}

json ToJson(const SideReport& report) {
  json out = json::object();
  SideReport copy = report;
  Fields(copy, [&](const char* name, const auto& value) { out[name] = value; });
  out["latency_p50_ms"] = report.percentile_ms(50);
  out["latency_p99_ms"] = report.percentile_ms(99);
  out["ok"] = report.ok();
  return out;
}

absl::StatusOr<SideReport> SideReportFromJson(const json& in) {
  SideReport report;
  absl::Status status;
  if (!in.is_object()) return absl::InvalidArgumentError("side report is not a JSON object");
  Fields(report, [&](const char* name, auto& value) {
    if (!status.ok()) return;
    auto field = in.find(name);
    if (field == in.end()) {
      status = absl::InvalidArgumentError(absl::StrCat("side report lacks a field: field=", name));
      return;
    }
    try {
      field->get_to(value);
    } catch (const json::exception& e) {
      status = absl::InvalidArgumentError(
          absl::StrCat("side report field of the wrong type: field=", name, " (", e.what(), ")"));
    }
  });
  if (!status.ok()) return status;
  return report;
}

std::string FormatTable(const SideReport& c, const SideReport& g, double seconds) {
  std::string out = absl::StrFormat(
      "transceiver: context %s (%s) -> generation %s (%s) over %s, %.1f s\n", c.instance, c.shape,
      g.instance, g.shape, g.transport.empty() ? c.transport : g.transport, seconds);
  auto row = [&out](const std::string& name, const std::string& context,
                    const std::string& generation) {
    absl::StrAppendFormat(&out, "  %-26s %16s %16s\n", name, context, generation);
  };
  auto n = [](int64_t v) { return absl::StrCat(v); };
  row("", "context", "generation");
  row("requests", n(c.requests), n(g.requests));
  row("  succeeded", n(c.succeeded), n(g.succeeded));
  row("  cancelled", n(c.cancelled), n(g.cancelled));
  row("  failed", n(c.failed), n(g.failed));
  row("bytes moved", Gb(c.bytes), Gb(g.bytes));
  row("GB/s (over the run)", absl::StrFormat("%.3f", c.seconds > 0 ? c.bytes / 1e9 / c.seconds : 0),
      absl::StrFormat("%.3f", g.seconds > 0 ? g.bytes / 1e9 / g.seconds : 0));
  row("writes posted", n(c.writes), "");
  row("block pairs sent", n(c.block_pairs), "");
  row("block pairs skipped", n(c.block_pairs_skipped), "");
  row("blocks sent (model)", "", n(g.blocks_sent));
  row("  skipped: prefix reuse", "", n(g.blocks_skipped_reuse));
  row("  skipped: window", "", n(g.blocks_skipped_window));
  row("latency p50 / p99 (ms)",
      absl::StrFormat("%.1f / %.1f", c.percentile_ms(50), c.percentile_ms(99)),
      absl::StrFormat("%.1f / %.1f", g.percentile_ms(50), g.percentile_ms(99)));
  row("bytes checked", "", Gb(g.bytes_checked));
  row("requests with a wrong byte", "", n(g.mismatches));
  row("late writes", "", n(g.late_writes));
  row("bad / dropped messages",
      absl::StrCat(c.metrics.bad_messages, " / ", c.metrics.dropped_messages),
      absl::StrCat(g.metrics.bad_messages, " / ", g.metrics.dropped_messages));
  row("fences", n(c.metrics.fences), n(g.metrics.fences));
  for (const SideReport* side : {&c, &g}) {
    for (const std::string& failure : side->failures) {
      absl::StrAppend(&out, "  FAILED ", failure, "\n");
    }
  }
  absl::StrAppend(&out, c.ok() && g.ok() ? "  result: OK\n" : "  result: FAILED\n");
  return out;
}

absl::StatusOr<InstanceOptions> SideOptions(const RunOptions& options, Role role) {
  absl::StatusOr<transfer::ModelSpec> model = BuildModel(options.model);
  if (!model.ok()) return model.status();
  InstanceOptions side;
  side.role = role;
  side.name = role == Role::kContext ? options.context_name : options.generation_name;
  side.context_name = options.context_name;
  side.model = *std::move(model);
  side.shape = role == Role::kContext ? options.context : options.generation;
  side.transport = options.transport;
  side.concurrency = options.concurrency;
  side.request_timeout = options.request_timeout;
  side.check_free_slots = options.check_free_slots;
  if (!options.curve_keys.empty()) {
    absl::StatusOr<transfer::ControlSecurity> security =
        transfer::LoadCurveSecurity(options.curve_keys, side.name);
    if (!security.ok()) {
      return absl::Status(
          security.status().code(),
          absl::StrCat("--curve_keys: ", security.status().message(),
                       " (make the pairs with `bazel run //tools:kvx_keygen -- --out_dir=",
                       options.curve_keys, " --name=", side.name, "`, once per instance)"));
    }
    side.control_security = *std::move(security);
  }
  return side;
}

namespace {

absl::StatusOr<std::vector<RequestPlan>> Workload(const RunOptions& options) {
  if (!options.plans.empty()) return options.plans;
  WorkloadOptions workload = options.workload;
  workload.context_dp_size = options.context.dp_size();
  workload.generation_dp_size = options.generation.dp_size();
  return MakeWorkload(workload, options.model.tokens_per_block);
}

}  // namespace

absl::StatusOr<RunReport> RunInProcess(const RunOptions& options) {
  absl::StatusOr<std::vector<RequestPlan>> workload = Workload(options);
  if (!workload.ok()) return workload.status();
  absl::StatusOr<InstanceOptions> context_options = SideOptions(options, Role::kContext);
  if (!context_options.ok()) return context_options.status();
  absl::StatusOr<InstanceOptions> generation_options = SideOptions(options, Role::kGeneration);
  if (!generation_options.ok()) return generation_options.status();
  absl::StatusOr<std::unique_ptr<Instance>> context =
      Instance::Create(*std::move(context_options), *workload);
  if (!context.ok()) return context.status();
  absl::StatusOr<std::unique_ptr<Instance>> generation =
      Instance::Create(*std::move(generation_options), *std::move(workload));
  if (!generation.ok()) return generation.status();
  const absl::Time start = absl::Now();
  if (absl::Status added = (*generation)->AddPeer((*context)->control_addresses(),
                                                  start + absl::Seconds(60));
      !added.ok()) {
    return added;
  }
  Progress progress;
  std::optional<ProgressPrinter> printer;
  if (options.progress) printer.emplace(&progress, "demo");
  const absl::Time deadline = start + options.run_timeout;
  (*context)->Start(deadline);
  (*generation)->Start(deadline, &progress);
  RunReport report;
  report.generation = (*generation)->Wait();
  report.context = (*context)->Wait();
  printer.reset();
  report.seconds = absl::ToDoubleSeconds(absl::Now() - start);
  return report;
}

absl::StatusOr<SideReport> RunSide(
    const RunOptions& options, Role role, absl::Span<const std::string> context_addresses,
    const SideHooks& hooks) {
  absl::StatusOr<std::vector<RequestPlan>> workload = Workload(options);
  if (!workload.ok()) return workload.status();
  absl::StatusOr<InstanceOptions> side = SideOptions(options, role);
  if (!side.ok()) return side.status();
  absl::StatusOr<std::unique_ptr<Instance>> instance =
      Instance::Create(*std::move(side), *std::move(workload));
  if (!instance.ok()) return instance.status();
  const absl::Time deadline = absl::Now() + options.run_timeout;
  if (role == Role::kContext) {
    if (hooks.on_addresses) hooks.on_addresses((*instance)->control_addresses());
    if (absl::Status peer = (*instance)->WaitForPeer(deadline); !peer.ok()) return peer;
  } else {
    absl::Status added =
        (*instance)->AddPeer(context_addresses, std::min(deadline, absl::Now() + absl::Seconds(60)));
    if (!added.ok()) return added;
  }
  Progress progress;
  std::optional<ProgressPrinter> printer;
  if (options.progress) printer.emplace(&progress, role == Role::kContext ? "context" : "generation");
  (*instance)->Start(deadline, &progress);
  SideReport report = (*instance)->Wait();
  printer.reset();
  if (hooks.on_report) hooks.on_report(report);
  return report;
}

}  // namespace kvx::harness
