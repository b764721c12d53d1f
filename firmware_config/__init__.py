"""Hardware profiles (TOML), one per kind of box; the schema lives in appliance.config.profile."""

from pathlib import Path

PROFILES_DIR = Path(__file__).parent / "profiles"


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))
