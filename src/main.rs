fn main() {
    std::process::exit(bitsmith::cli::main());
}
