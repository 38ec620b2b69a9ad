// UCX transfers between two processes (a helper binary plays the peer), over tcp and shared memory, and the
// survivor's view when the peer is killed with SIGKILL mid-room.
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "common/transfer/checksum.h"
#include "common/transfer/loopback_transport.h"
#include "common/transfer/ucx_transport.h"
#include "tests/unit/transfer/test_util.h"

extern char** environ;

namespace tandem::transfer {
namespace {

using namespace std::chrono_literals;
constexpr uint64_t kPage = 37440;

class Child {
 public:
  explicit Child(std::vector<std::string> args) {
    args.insert(args.begin(), TANDEM_TRANSFER_PEER_BIN);
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    EXPECT_EQ(::posix_spawn(&pid_, argv[0], nullptr, nullptr, argv.data(), environ), 0);
  }
  ~Child() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      Wait();
    }
  }
  void Kill() { ::kill(pid_, SIGKILL); }
  int Wait() {
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

 private:
  pid_t pid_ = -1;
};

std::string TempPath(const std::string& name) {
  return (std::filesystem::temp_directory_path() / (name + "." + std::to_string(::getpid()))).string();
}

// Polls (with a deadline) until the file exists; returns its contents.
std::string WaitForFile(const std::string& path, std::chrono::seconds timeout = 20s) {
  const auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    std::ifstream in(path);
    std::string text;
    if (in && std::getline(in, text) && !text.empty()) return text;
    std::this_thread::sleep_for(2ms);
  }
  return "";
}

std::string Tls(const std::string& param) { return param == "tcp" ? "tcp" : "self,sm"; }

class TwoProcesses : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    UcxOptions options;
    options.tls = Tls(GetParam());
    auto transport = UcxTransport::Create(options);
    ASSERT_TRUE(transport.ok()) << transport.status();
    transport_ = std::move(*transport);
  }
  testing::DoneRecorder done_;
  std::unique_ptr<UcxTransport> transport_;
};

TEST_P(TwoProcesses, PrefillProcessWritesIntoDecodePages) {
  auto dst = testing::RegisterBuffer(*transport_, "c4_kv", 64 * kPage, 0);
  auto decode = DecodeAgent::Create(transport_.get(), testing::TestHandshake(), testing::FastOptions());
  ASSERT_TRUE(decode.ok());
  const std::string port_file = TempPath("transfer-port-" + GetParam());
  std::filesystem::remove(port_file);
  Child prefill({"prefill", Tls(GetParam()), port_file, "9001", "12"});
  const std::string port = WaitForFile(port_file);
  ASSERT_FALSE(port.empty());
  // Destination pages 0, 2, 4, ...: twelve separate puts.
  auto segments = testing::PageSegments(dst.region, 12, kPage, 2, 0);
  ASSERT_TRUE((*decode)->Register(9001, "127.0.0.1", static_cast<uint16_t>(std::stoi(port)), segments, done_.Callback()).ok());
  auto completion = (*decode)->WaitCompletion(9001, 20s);
  ASSERT_TRUE(completion.ok()) << completion.status();
  EXPECT_EQ(completion->first_token, 11);
  EXPECT_EQ(completion->payload, "extra");
  LoopbackTransport reference_transport;  // regenerates the prefill's pattern
  auto reference = testing::RegisterBuffer(reference_transport, "c4_kv", 64 * kPage, 7);
  for (size_t p = 0; p < 12; ++p) {
    ASSERT_EQ(0, std::memcmp(dst.bytes.data() + 2 * p * kPage, reference.bytes.data() + p * kPage, kPage)) << "page " << p;
  }
  ASSERT_TRUE((*decode)->Ack(9001).ok());
  EXPECT_EQ(prefill.Wait(), 0);
  std::filesystem::remove(port_file);
}

TEST_P(TwoProcesses, KilledPrefillFailsDecodeRoomsWithUnavailable) {
  auto dst = testing::RegisterBuffer(*transport_, "c4_kv", 64 * kPage, 0);
  auto decode = DecodeAgent::Create(transport_.get(), testing::TestHandshake(), testing::FastOptions());
  ASSERT_TRUE(decode.ok());
  const std::string port_file = TempPath("transfer-kill-" + GetParam());
  std::filesystem::remove(port_file);
  std::filesystem::remove(port_file + ".ready");
  Child prefill({"prefill", Tls(GetParam()), port_file, "9002", "4", "hang"});
  const std::string port = WaitForFile(port_file);
  ASSERT_FALSE(port.empty());
  ASSERT_TRUE((*decode)->Register(9002, "127.0.0.1", static_cast<uint16_t>(std::stoi(port)),
                                  testing::PageSegments(dst.region, 4, kPage, 1, 0), done_.Callback()).ok());
  ASSERT_FALSE(WaitForFile(port_file + ".ready").empty());
  prefill.Kill();
  auto waited = (*decode)->WaitCompletion(9002, 20s);
  EXPECT_EQ(waited.status().code(), absl::StatusCode::kUnavailable) << waited.status();
  auto done = done_.Wait(9002);
  ASSERT_TRUE(done.has_value());
  EXPECT_EQ(done->code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ((*decode)->metrics().live_rooms, 0u);
  std::filesystem::remove(port_file);
  std::filesystem::remove(port_file + ".ready");
}

TEST_P(TwoProcesses, KilledDecodeFailsPrefillRoomsWithUnavailable) {
  auto src = testing::RegisterBuffer(*transport_, "c4_kv", 64 * kPage, 7);
  auto prefill = PrefillAgent::Create(transport_.get(), testing::TestHandshake(), testing::FastOptions(), "127.0.0.1", 0);
  ASSERT_TRUE(prefill.ok());
  ASSERT_TRUE((*prefill)->ExpectRoom(9003, done_.Callback()).ok());
  const std::string ready = TempPath("transfer-decode-ready-" + GetParam());
  std::filesystem::remove(ready);
  Child decode({"decode", Tls(GetParam()), std::to_string((*prefill)->port()), "9003", "4", ready});
  auto destination = (*prefill)->WaitDestination(9003, 20s);
  ASSERT_TRUE(destination.ok()) << destination.status();
  auto segments = testing::PageSegments(src.region, 4, kPage, 1, 0);
  ASSERT_TRUE((*prefill)->Ship(9003, 0, std::span(segments).first(2)).ok());
  decode.Kill();
  auto done = done_.Wait(9003);
  ASSERT_TRUE(done.has_value());
  EXPECT_EQ(done->code(), absl::StatusCode::kUnavailable) << *done;
  EXPECT_EQ((*prefill)->Ship(9003, 2, std::span(segments).subspan(2)).code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ((*prefill)->metrics().live_rooms, 0u);
  std::filesystem::remove(ready);
}

INSTANTIATE_TEST_SUITE_P(Ucx, TwoProcesses, ::testing::Values("tcp", "sm"));

}  // namespace
}  // namespace tandem::transfer
