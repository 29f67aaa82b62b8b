"""The node agent: reads devices and engines, streams reports, applies caps, fails safe."""
