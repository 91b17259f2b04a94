// Child processes of the demo and the tests: spawned, fed, read, killed, reaped.

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>  // NOLINT(build/c++11)
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "tools/transceiver_harness.h"

extern char** environ;

namespace kvx::harness {

absl::StatusOr<std::unique_ptr<ChildProcess>> ChildProcess::Spawn(
    const std::string& path, const std::vector<std::string>& args) {
  int to_child[2];
  int from_child[2];
  if (pipe2(to_child, O_CLOEXEC) != 0) {
    return absl::InternalError(absl::StrCat("pipe2: ", std::strerror(errno)));
  }
  if (pipe2(from_child, O_CLOEXEC) != 0) {
    const int error = errno;
    close(to_child[0]);
    close(to_child[1]);
    return absl::InternalError(absl::StrCat("pipe2: ", std::strerror(error)));
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, to_child[0], 0);
  posix_spawn_file_actions_adddup2(&actions, from_child[1], 1);
  std::vector<char*> argv = {const_cast<char*>(path.c_str())};
  for (const std::string& arg : args) argv.push_back(const_cast<char*>(arg.c_str()));
  argv.push_back(nullptr);
  auto child = std::unique_ptr<ChildProcess>(new ChildProcess());
  pid_t pid = -1;
  const int ret = posix_spawn(&pid, path.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  close(to_child[0]);
  close(from_child[1]);
  child->stdin_ = to_child[1];
  child->stdout_ = from_child[0];
  if (ret != 0) {
    return absl::InternalError(absl::StrCat("posix_spawn: path=", path, ": ", std::strerror(ret)));
  }
  child->pid_ = pid;
  return child;
}

ChildProcess::~ChildProcess() {
  if (pid_ > 0 && !reaped_) {
    kill(pid_, SIGKILL);
    while (waitpid(pid_, nullptr, 0) < 0 && errno == EINTR) {
    }
  }
  if (stdin_ >= 0) close(stdin_);
  if (stdout_ >= 0) close(stdout_);
}

absl::StatusOr<std::string> ChildProcess::ReadLine(absl::Time deadline) {
  for (;;) {
    const size_t newline = buffer_.find('\n');
    if (newline != std::string::npos) {
      std::string line = buffer_.substr(0, newline);
      buffer_.erase(0, newline + 1);
      return line;
    }
    const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (ms <= 0) {
      return absl::DeadlineExceededError(
          absl::StrCat("child wrote no whole line in time: pid=", pid_));
    }
    pollfd fd{stdout_, POLLIN, 0};
    const int ready = poll(&fd, 1, static_cast<int>(std::min<int64_t>(ms, 1000)));
    if (ready < 0 && errno != EINTR) {
      return absl::InternalError(absl::StrCat("poll: ", std::strerror(errno)));
    }
    if (ready <= 0) continue;
    char chunk[4096];
    const ssize_t n = read(stdout_, chunk, sizeof(chunk));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return absl::UnavailableError(absl::StrCat("child closed its stdout: pid=", pid_));
    }
    buffer_.append(chunk, static_cast<size_t>(n));
  }
}

absl::Status ChildProcess::WriteLine(absl::string_view line) {
  std::string out = absl::StrCat(line, "\n");
  size_t written = 0;
  while (written < out.size()) {
    const ssize_t n = write(stdin_, out.data() + written, out.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return absl::UnavailableError(absl::StrCat("cannot write to the child's stdin: pid=", pid_,
                                                 ": ", std::strerror(errno)));
    }
    written += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

void ChildProcess::CloseStdin() {
  if (stdin_ >= 0) close(stdin_);
  stdin_ = -1;
}

void ChildProcess::Kill(int signal) {
  if (pid_ > 0 && !reaped_) kill(pid_, signal);
}

absl::StatusOr<int> ChildProcess::Wait(absl::Time deadline) {
  for (;;) {
    int status = 0;
    const pid_t got = waitpid(pid_, &status, WNOHANG);
    if (got == pid_) {
      reaped_ = true;
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    if (got < 0 && errno != EINTR) {
      return absl::InternalError(absl::StrCat("waitpid: pid=", pid_, ": ", std::strerror(errno)));
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("child still running: pid=", pid_));
    }
    // waitpid has no timeout; a child that exits is seen within 5 ms.
    absl::SleepFor(absl::Milliseconds(5));
  }
}

void ExitWhenClosed(int fd, const std::atomic<bool>* finished,
                    std::function<void(std::string)> on_line) {
  std::thread([fd, finished, on_line = std::move(on_line)] {
    char byte;
    std::string line;
    for (;;) {
      const ssize_t n = read(fd, &byte, 1);
      if (n == 0 || (n < 0 && errno != EINTR)) {
        std::fflush(stdout);
        std::_Exit(finished->load() ? 0 : 3);
      }
      if (n < 0 || !on_line) continue;
      if (byte != '\n') {
        line.push_back(byte);
      } else {
        on_line(std::move(line));
        line.clear();
      }
    }
  }).detach();
}

}  // namespace kvx::harness
