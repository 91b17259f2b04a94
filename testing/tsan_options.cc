// ThreadSanitizer settings for tests that link an uninstrumented system library
// which runs threads of its own (ZeroMQ). A test depends on //testing:tsan_options;
// TSAN reads __tsan_default_options() at startup, before TSAN_OPTIONS from the
// environment (which .bazelrc's tsan config sets and which still applies on top).
// Only one definition may exist per binary, so every such setting lives here.
//
// ignore_noninstrumented_modules=1: Debian's libzmq (like libstdc++ and Abseil
// here) is not built with -fsanitize=thread. ZeroMQ hands objects (endpoint
// strings, messages, pipes) from the calling thread to its I/O threads through
// lock-free queues whose atomics TSAN cannot see, so each hand-over that reaches
// an interceptor (memcmp, memcpy, malloc called from inside those libraries) is
// reported as a race with a "ZMQbg" thread. This flag ignores the interceptors
// that uninstrumented code calls, as TSAN does by default on macOS; every access
// made by kvx code, which is instrumented, is still checked. A suppression cannot
// do it: clang 14's TSAN never sees libzmq's frames in the racing stacks (only in
// the creation stack of its threads, which race suppressions do not match).
extern "C" const char* __tsan_default_options() {
  return "ignore_noninstrumented_modules=1";
}
