// A context instance that dies mid-transfer: the tool's `context` side runs as a
// child process (libfabric tcp;ofi_rxm on 127.0.0.1) and is killed with SIGKILL
// while requests are in flight. The generation side, in this process, must end
// every affected request in kError within its timeout (no hang), keep every byte it
// verified and every block it held intact, let nothing land in freed pages, and
// serve a restarted context instance afterwards.

#include <signal.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "testing/status_matchers.h"
#include "tools/transceiver_harness.h"
#include "transfer/transceiver/transceiver.h"

namespace kvx::harness {
namespace {

using ::testing::AnyOf;
using ::testing::HasSubstr;

std::string ToolPath() {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  return absl::StrCat(srcdir != nullptr ? srcdir : ".", "/kvx/tools/transceiver");
}

// The child's flags, and the same run as options for this side.
struct Side {
  std::vector<std::string> flags;
  RunOptions options;
};

// `owed`: requests at the end of the stream that only the generation side has (the
// first `requests` plans are the same for both: the stream is drawn in order), so
// the context side holds their request data and never sends them.
Side MakeSide(uint64_t first_rid, int64_t requests, int64_t min_prompt, int64_t max_prompt,
              int64_t owed = 0) {
  Side side;
  side.flags = {"--transport=tcp",
                "--context_tp=1",
                absl::StrCat("--requests=", requests),
                absl::StrCat("--first_rid=", first_rid),
                "--seed=11",
                absl::StrCat("--min_prompt=", min_prompt),
                absl::StrCat("--max_prompt=", max_prompt),
                "--hit_rate=0.3",
                "--chunk_rate=0.3",
                "--cancel_rate=0",
                "--concurrency=4",
                "--request_timeout_s=20",
                "--json_only",
                "--exit_on_stdin_eof",
                "--progress=false"};
  RunOptions& o = side.options;
  o.context.tp = 1;
  o.transport.kind = "tcp";
  o.workload.requests = requests + owed;
  o.workload.first_rid = first_rid;
  o.workload.seed = 11;
  o.workload.min_prompt = min_prompt;
  o.workload.max_prompt = max_prompt;
  o.workload.hit_rate = 0.3;
  o.workload.chunk_rate = 0.3;
  o.workload.cancel_rate = 0;
  // Every request is asked for at once, so that the ones the dead side owes all
  // end within one timeout of each other.
  o.concurrency = requests + owed;
  // A dead peer says nothing: the generation side learns it from its deadline.
  o.request_timeout = absl::Seconds(8);
  o.run_timeout = absl::Seconds(120);
  return side;
}

// The context side as a child process; returns its control addresses.
absl::StatusOr<std::vector<std::string>> StartContext(const Side& side,
                                                      std::unique_ptr<ChildProcess>* child) {
  std::vector<std::string> args = {"context"};
  args.insert(args.end(), side.flags.begin(), side.flags.end());
  absl::StatusOr<std::unique_ptr<ChildProcess>> spawned = ChildProcess::Spawn(ToolPath(), args);
  if (!spawned.ok()) return spawned.status();
  *child = *std::move(spawned);
  absl::StatusOr<std::string> line = (*child)->ReadLine(absl::Now() + absl::Seconds(60));
  if (!line.ok()) return line.status();
  const nlohmann::json j = nlohmann::json::parse(*line, nullptr, false);
  if (!j.is_object() || !j.contains("control_addresses")) {
    return absl::InternalError(absl::StrCat("unexpected line from the context child: ", *line));
  }
  return j["control_addresses"].get<std::vector<std::string>>();
}

absl::StatusOr<std::unique_ptr<Instance>> Generation(const Side& side) {
  absl::StatusOr<InstanceOptions> options = SideOptions(side.options, Role::kGeneration);
  if (!options.ok()) return options.status();
  options->report_grace = absl::Milliseconds(500);
  WorkloadOptions workload = side.options.workload;
  absl::StatusOr<std::vector<RequestPlan>> plans =
      MakeWorkload(workload, side.options.model.tokens_per_block);
  if (!plans.ok()) return plans.status();
  return Instance::Create(*std::move(options), *std::move(plans));
}

class TransceiverKillTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // The child is built like this test; under ThreadSanitizer it needs the same
    // settings for ZeroMQ as //testing:tsan_options gives this process.
    const char* tsan = std::getenv("TSAN_OPTIONS");
    setenv("TSAN_OPTIONS",
           absl::StrCat(tsan != nullptr ? tsan : "", ":ignore_noninstrumented_modules=1").c_str(),
           1);
  }
};

TEST_F(TransceiverKillTest, ContextKilledMidTransferFailsOnlyWhatItOwedAndARestartServes) {
  // Long prompts, so that requests are in flight when the child dies; four more
  // that it certainly owes when it dies.
  Side first = MakeSide(1, 40, 2048, 4096, /*owed=*/4);
  std::unique_ptr<ChildProcess> child;
  ASSERT_OK_AND_ASSIGN(std::vector<std::string> addresses, StartContext(first, &child));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Instance> generation, Generation(first));
  ASSERT_OK(generation->AddPeer(addresses, absl::Now() + absl::Seconds(30)));
  generation->Start(absl::Now() + first.options.run_timeout);
  // Kill once the transceiver has delivered three requests (before the engine has
  // checked them: the context side, four at a time, is then still mid-stream).
  // A counter that cannot be awaited: poll it.
  const absl::Time patience = absl::Now() + absl::Seconds(60);
  transceiver::TransceiverMetrics metrics;
  while ((metrics = generation->rank(0).transceiver().metrics()).requests_succeeded < 3 &&
         absl::Now() < patience) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  ASSERT_GE(metrics.requests_succeeded, 3);
  EXPECT_EQ(metrics.requests_failed, 0);
  child->Kill(SIGKILL);
  ASSERT_OK_AND_ASSIGN(int status, child->Wait(absl::Now() + absl::Seconds(10)));
  EXPECT_EQ(status, 128 + SIGKILL);
  const absl::Time killed = absl::Now();
  SideReport report = generation->Wait();
  const std::string table = FormatTable(SideReport{}, report, report.seconds);
  // Every request the dead side owed ends by its deadline and the report grace
  // (8 s + 0.5 s), and no later.
  EXPECT_LT(absl::Now() - killed, absl::Seconds(15)) << table;
  EXPECT_EQ(report.requests, 44);
  EXPECT_GE(report.succeeded, 3) << table;
  EXPECT_GE(report.failed, 4) << table;
  EXPECT_EQ(report.succeeded + report.failed, 44) << table;
  // How many of the child's own 40 the kill cut off (usually most of them).
  std::printf("killed after %d succeeded; %d of the child's requests cut off\n",
              static_cast<int>(report.succeeded), static_cast<int>(report.failed - 4));
  EXPECT_EQ(report.mismatches, 0) << table;
  EXPECT_EQ(report.late_writes, 0) << table;
  for (const std::string& failure : report.failures) {
    EXPECT_THAT(failure, HasSubstr("ended ERROR")) << table;
    EXPECT_THAT(failure, AnyOf(HasSubstr("DEADLINE_EXCEEDED"), HasSubstr("UNAVAILABLE"))) << table;
  }

  // The instance comes back (same name, new endpoints): the generation ranks see
  // a restart, and the next stream is clean, in pages the failed requests held.
  Side second = MakeSide(1000, 12, 16, 512);
  std::unique_ptr<ChildProcess> restarted;
  ASSERT_OK_AND_ASSIGN(std::vector<std::string> again, StartContext(second, &restarted));
  ASSERT_OK(generation->AddPeer(again, absl::Now() + absl::Seconds(30)));
  ASSERT_OK_AND_ASSIGN(std::vector<RequestPlan> plans,
                       MakeWorkload(second.options.workload, second.options.model.tokens_per_block));
  generation->Reset(plans);
  generation->Start(absl::Now() + second.options.run_timeout);
  report = generation->Wait();
  EXPECT_TRUE(report.ok()) << FormatTable(SideReport{}, report, report.seconds);
  EXPECT_EQ(report.succeeded, 12);
  // The restarted side ends cleanly once told to.
  ASSERT_OK_AND_ASSIGN(std::string line, restarted->ReadLine(absl::Now() + absl::Seconds(30)));
  ASSERT_OK_AND_ASSIGN(SideReport context,
                       SideReportFromJson(nlohmann::json::parse(line, nullptr, false)));
  EXPECT_TRUE(context.ok()) << line;
  EXPECT_EQ(context.succeeded, 12);
  restarted->CloseStdin();
  ASSERT_OK_AND_ASSIGN(status, restarted->Wait(absl::Now() + absl::Seconds(10)));
  EXPECT_EQ(status, 0);
}

}  // namespace
}  // namespace kvx::harness
