"""Developer-machine tools (fake FCM, console). Never imported by shared/ or functions/."""
