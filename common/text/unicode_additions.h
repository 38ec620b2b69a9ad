// Unicode 16.0 characters missing from PCRE2's Unicode 14.0 tables, per major general category,
// so the pre-tokenizer's \p{X} classes match HF tokenizers (whose Oniguruma has 16.0).
#pragma once

#include <string_view>

namespace tandem::text {

// PCRE2 class members (e.g. "\x{1B4E}-\x{1B4F}...") for 'L', 'M', 'N', 'P' or 'S'; empty otherwise.
std::string_view Unicode16Additions(char major_category);

}  // namespace tandem::text
